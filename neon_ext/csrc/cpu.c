/* Which SIMD paths exist in this build and which one this CPU should use. */
#include "nx_kernels.h"

int nx_cpu_has_avx2_fma(void)
{
#if NX_HAVE_AVX2
    /* libgcc's check includes the OS (XGETBV) support for the YMM state. */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int nx_path_compiled(nx_path p)
{
    switch (p) {
    case NX_SCALAR: return 1;
    case NX_AVX2: return NX_HAVE_AVX2;
    case NX_NEON: return NX_HAVE_NEON; /* NEON (ASIMD) is mandatory on aarch64 */
    }
    return 0;
}

int nx_path_supported(nx_path p)
{
    if (p == NX_AVX2) return nx_cpu_has_avx2_fma();
    return nx_path_compiled(p);
}

nx_path nx_best_path(void)
{
    if (nx_path_supported(NX_NEON)) return NX_NEON;
    if (nx_path_supported(NX_AVX2)) return NX_AVX2;
    return NX_SCALAR;
}

const char *nx_path_name(nx_path p)
{
    switch (p) {
    case NX_SCALAR: return "scalar";
    case NX_AVX2: return "avx2";
    case NX_NEON: return "neon";
    }
    return "?";
}
