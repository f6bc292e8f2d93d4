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

/* Member types come from the prototypes in nx_kernels.h, so the table cannot drift from them. */
typedef struct {
    unsigned version;
    const nx_path *path; /* the active path */
    __typeof__(&nx_softmax) softmax;
    __typeof__(&nx_rmsnorm) rmsnorm;
    __typeof__(&nx_fused_add_rmsnorm) fused_add_rmsnorm;
    __typeof__(&nx_silu_and_mul) silu_and_mul;
    __typeof__(&nx_gelu_tanh_and_mul) gelu_tanh_and_mul;
    __typeof__(&nx_rope) rope;
} nx_capi;

#endif
