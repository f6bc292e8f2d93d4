/* Shared definitions for the neon_ext kernels: SIMD paths, target attributes, small helpers.
 *
 * Every kernel family is compiled for the portable C path and, depending on the
 * architecture, for AVX2/FMA (x86-64) or NEON (aarch64).  The x86 variants use
 * function-level target attributes, so the library itself is built for the
 * baseline ISA and runs on any x86-64; the caller picks a path at run time. */
#ifndef NX_COMMON_H
#define NX_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum { NX_SCALAR = 0, NX_AVX2 = 1, NX_NEON = 2 } nx_path;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NX_HAVE_AVX2 1
#include <immintrin.h>
/* F16C (half-float conversion) ships with every AVX2 CPU; fp8.c uses it. */
#define NX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define NX_HAVE_AVX2 0
#endif

#if defined(__aarch64__)
#define NX_HAVE_NEON 1
#include <arm_neon.h>
#else
#define NX_HAVE_NEON 0
#endif

/* Type punning through memcpy: well defined and compiled to a register move. */
static inline uint32_t nx_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float nx_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

#endif
