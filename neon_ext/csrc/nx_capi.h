/* The kernels as a table for other extension modules.
 *
 * neon_ext._kernels exports this table in the capsule NX_CAPI_NAME, so that the torch
 * binding (torch_binding.cpp) calls the one copy of the kernels with the one active
 * path that set_path() changes, instead of linking a second copy with its own path. */
#ifndef NX_CAPI_H
#define NX_CAPI_H

#include "nx_kernels.h"

#define NX_CAPI_NAME "neon_ext._kernels._C_API"
#define NX_CAPI_VERSION 1

typedef struct {
    unsigned version;
    const nx_path *path; /* the active path */
    void (*softmax)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, size_t, size_t, float, int, size_t);
    void (*rmsnorm)(nx_path, const float *, ptrdiff_t, const float *, float *, ptrdiff_t, size_t, size_t, float);
    void (*fused_add_rmsnorm)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, const float *, float *,
                              ptrdiff_t, size_t, size_t, float);
    void (*silu_and_mul)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, size_t, size_t);
    void (*gelu_tanh_and_mul)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, size_t, size_t);
    int (*rope)(nx_path, const int64_t *, size_t, float *, ptrdiff_t, size_t, float *, ptrdiff_t, size_t, size_t,
                size_t, int, const float *, size_t, float);
} nx_capi;

#endif
