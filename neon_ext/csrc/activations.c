/* Gated MLP activations: SwiGLU (silu(gate) * up), GeLU with the tanh
 * approximation, and GeLU-and-mul.
 *
 * Both activations are written as x * sigmoid(z) = x / (1 + exp(-z)):
 *   silu(x)      : z = x
 *   gelu_tanh(x) : 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3)
 * This needs one exp and one division, and for large negative x it returns a
 * correctly signed tiny value instead of cancelling 1 + tanh(u) to 0.  The SIMD
 * paths use the activation exp (shorter polynomial, saturating: 1 + exp(z) is then
 * 1 or >= 2.4e38 at the ends of the range, as it should be).  AVX2 divides: the
 * divider runs beside the FMA pipes that bound this loop, so a division is cheaper
 * than a reciprocal estimate and Newton step on them.  NEON refines a reciprocal
 * estimate instead.  Either way within a few ULP, far inside the 1e-5 tolerance. */
#include "nx_kernels.h"
#include "nx_vexp.h"

/* -2 * sqrt(2/pi) and -2 * sqrt(2/pi) * 0.044715: gelu's z = x * (G0 + G1 * x^2) negated. */
#define NX_G0 -1.5957691216057308f
#define NX_G1 -0.0713548162726009f

enum { ACT_SILU, ACT_GELU_TANH };

/* ---- portable C ---- */

static inline float silu_scalar(float x) { return x / (1.0f + nx_exp_scalar(-x)); }
static inline float gelu_scalar(float x) { return x / (1.0f + nx_exp_scalar(x * (NX_G0 + NX_G1 * x * x))); }

static void gated_scalar(int act, const float *g, const float *u, float *y, size_t n)
{
    if (act == ACT_SILU)
        for (size_t i = 0; i < n; i++) y[i] = silu_scalar(g[i]) * u[i];
    else
        for (size_t i = 0; i < n; i++) y[i] = gelu_scalar(g[i]) * u[i];
}

static void gelu_scalar_n(const float *x, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++) y[i] = gelu_scalar(x[i]);
}

/* ---- AVX2 / FMA ---- */
#if NX_HAVE_AVX2
/* x / (1 + e) for e in [0, 2.4e38] */
static inline NX_TARGET_AVX2 __m256 div_1pe_avx2(__m256 x, __m256 e)
{
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static inline NX_TARGET_AVX2 __m256 silu_avx2(__m256 x)
{
    return div_1pe_avx2(x, nx_expneg_avx2_act(x));
}

static inline NX_TARGET_AVX2 __m256 gelu_avx2(__m256 x)
{
    __m256 z = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(NX_G1), _mm256_set1_ps(NX_G0)));
    return div_1pe_avx2(x, nx_exp_avx2_act(z));
}

static NX_TARGET_AVX2 void gated_avx2(int act, const float *g, const float *u, float *y, size_t n)
{
    size_t i = 0;
    if (act == ACT_SILU)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_mul_ps(silu_avx2(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
    else
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_mul_ps(gelu_avx2(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
    gated_scalar(act, g + i, u + i, y + i, n - i);
}

static NX_TARGET_AVX2 void gelu_avx2_n(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu_avx2(_mm256_loadu_ps(x + i)));
    gelu_scalar_n(x + i, y + i, n - i);
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
/* x / (1 + e) for e in [0, 2.4e38]: reciprocal estimate (8 bits) and two Newton steps. */
static inline float32x4_t div_1pe_neon(float32x4_t x, float32x4_t e)
{
    float32x4_t d = vaddq_f32(vdupq_n_f32(1.0f), e);
    float32x4_t r = vrecpeq_f32(d);
    r = vmulq_f32(r, vrecpsq_f32(d, r));
    r = vmulq_f32(r, vrecpsq_f32(d, r));
    return vmulq_f32(x, r);
}

static inline float32x4_t silu_neon(float32x4_t x)
{
    return div_1pe_neon(x, nx_exp_neon_act(vnegq_f32(x)));
}

static inline float32x4_t gelu_neon(float32x4_t x)
{
    float32x4_t z = vmulq_f32(x, vfmaq_f32(vdupq_n_f32(NX_G0), vmulq_f32(x, x), vdupq_n_f32(NX_G1)));
    return div_1pe_neon(x, nx_exp_neon_act(z));
}

static void gated_neon(int act, const float *g, const float *u, float *y, size_t n)
{
    size_t i = 0;
    if (act == ACT_SILU)
        for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(silu_neon(vld1q_f32(g + i)), vld1q_f32(u + i)));
    else
        for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(gelu_neon(vld1q_f32(g + i)), vld1q_f32(u + i)));
    gated_scalar(act, g + i, u + i, y + i, n - i);
}

static void gelu_neon_n(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, gelu_neon(vld1q_f32(x + i)));
    gelu_scalar_n(x + i, y + i, n - i);
}
#endif

static void gated_rows(nx_path p, int act, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                       size_t rows, size_t d)
{
    void (*fn)(int, const float *, const float *, float *, size_t) = gated_scalar;
#if NX_HAVE_AVX2
    if (p == NX_AVX2) fn = gated_avx2;
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) fn = gated_neon;
#endif
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + (ptrdiff_t)r * x_rs;
        fn(act, xr, xr + d, y + (ptrdiff_t)r * y_rs, d);
    }
}

void nx_silu_and_mul(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                     size_t rows, size_t d)
{
    gated_rows(p, ACT_SILU, x, x_rs, y, y_rs, rows, d);
}

void nx_gelu_tanh_and_mul(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                          size_t rows, size_t d)
{
    gated_rows(p, ACT_GELU_TANH, x, x_rs, y, y_rs, rows, d);
}

void nx_gelu_tanh(nx_path p, const float *x, float *y, size_t n)
{
    void (*fn)(const float *, float *, size_t) = gelu_scalar_n;
#if NX_HAVE_AVX2
    if (p == NX_AVX2) fn = gelu_avx2_n;
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) fn = gelu_neon_n;
#endif
    fn(x, y, n);
}
