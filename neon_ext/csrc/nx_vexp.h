/* Vectorised single-precision exp shared by softmax and the activations.
 *
 * exp(x) = 2^n * e^r with n = round(x / ln2) and r = x - n*ln2 in [-ln2/2, ln2/2].
 * ln2 is split into a high part with few mantissa bits (n*LN2_HI is exact) and a
 * low correction, then e^r comes from the Cephes degree-6 minimax polynomial and
 * 2^n is assembled directly in the exponent field.  Error is within 2 ULP over
 * the whole range.  Inputs above NX_EXP_HI give +inf, inputs below NX_EXP_LO
 * (where the result would be subnormal) give 0, NaN stays NaN.
 *
 * The _hl variants take the argument as an unevaluated sum hi + lo with |lo| far
 * below ulp(hi) and fold lo into r: exp is ill-conditioned in absolute terms
 * (an argument error d is a relative result error d), so softmax passes the
 * rounding error of x*scale - max as lo to stay within 1e-6 for any input.
 * The _act variants, for the activations, use a degree-5 fit (1.1e-7), reduce
 * with one rounded ln2 (below 2e-7 more) and saturate instead of returning inf/0. */
#ifndef NX_VEXP_H
#define NX_VEXP_H

#include <math.h>
#include "nx_common.h"

#define NX_EXP_HI 88.3762626647949f
#define NX_EXP_LO -87.3365478515625f
#define NX_LOG2E 1.44269504088896341f
#define NX_LN2 0.693147182f
#define NX_LN2_HI 0.693359375f
#define NX_LN2_LO -2.12194440e-4f
#define NX_EXP_P0 1.9875691500e-4f
#define NX_EXP_P1 1.3981999507e-3f
#define NX_EXP_P2 8.3334519073e-3f
#define NX_EXP_P3 4.1665795894e-2f
#define NX_EXP_P4 1.6666665459e-1f
#define NX_EXP_P5 5.0000001201e-1f
/* Degree-5 fit (relative error 1.1e-7) used by the activations, which need 1e-5. */
#define NX_EXP_Q0 8.3124032e-3f
#define NX_EXP_Q1 4.1890409e-2f
#define NX_EXP_Q2 1.6667116e-1f
#define NX_EXP_Q3 4.9999228e-1f

static inline float nx_exp_scalar_hl(float x, float lo)
{
    if (x != x) return x;
    if (x > NX_EXP_HI) return INFINITY;
    if (x < NX_EXP_LO) return 0.0f;
    /* Adding and subtracting 1.5*2^23 rounds to the nearest integer (ties to even)
     * without a libm call. */
    float n = (x * NX_LOG2E + 12582912.0f) - 12582912.0f;
    float r = x - n * NX_LN2_HI;
    r = r - n * NX_LN2_LO + lo;
    float p = NX_EXP_P0;
    p = p * r + NX_EXP_P1;
    p = p * r + NX_EXP_P2;
    p = p * r + NX_EXP_P3;
    p = p * r + NX_EXP_P4;
    p = p * r + NX_EXP_P5;
    float y = p * (r * r) + r + 1.0f;
    return y * nx_u2f((uint32_t)((int32_t)n + 127) << 23);
}

static inline float nx_exp_scalar(float x) { return nx_exp_scalar_hl(x, 0.0f); }

/* Adding this rounds x*log2(e) to an integer n (ties to even) held in the low
 * mantissa bits as n + 127, so shifting the bits left by 23 gives 2^n directly. */
#define NX_EXP_SHIFTER 12583039.0f /* 1.5 * 2^23 + 127 */

#if NX_HAVE_AVX2
/* accurate: the degree-6 polynomial, +inf above NX_EXP_HI, 0 below NX_EXP_LO, and
 * the low part lo added in.  Otherwise (activations): the degree-5 fit, lo ignored,
 * and the result saturates at exp(NX_EXP_LO) and exp(NX_EXP_HI), which is exactly
 * right for 1 + exp(z).  neg computes exp(-x) without a separate negation.
 *
 * These loops are bound by latency, not by issue width: the out-of-order window
 * holds only a few vectors' worth of this chain.  So the polynomial is evaluated
 * in Estrin form, the low-order reduction terms are summed off the critical path,
 * and 2^n is folded into the last FMA, y = q*2^n + 2^n with q = e^r - 1.  The
 * clamp keeps n <= 127, so 2^n is always a finite normal. */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) __m256
nx_exp_avx2_core(__m256 x, __m256 lo, const int accurate, const int nonpos, const int neg)
{
    /* max/min return their second operand when one is NaN, so NaN survives the clamp.
     * nonpos: the caller guarantees x <= 0 or NaN (softmax), so the upper clamp and the
     * +inf fix-up are skipped. */
    __m256 xc;
    if (neg) /* clamp x to [-HI, -LO]: the same range for -x */
        xc = _mm256_min_ps(_mm256_set1_ps(-NX_EXP_LO), _mm256_max_ps(_mm256_set1_ps(-NX_EXP_HI), x));
    else {
        xc = _mm256_max_ps(_mm256_set1_ps(NX_EXP_LO), x);
        if (!nonpos) xc = _mm256_min_ps(_mm256_set1_ps(NX_EXP_HI), xc);
    }
    __m256 t = neg ? _mm256_fnmadd_ps(xc, _mm256_set1_ps(NX_LOG2E), _mm256_set1_ps(NX_EXP_SHIFTER))
                   : _mm256_fmadd_ps(xc, _mm256_set1_ps(NX_LOG2E), _mm256_set1_ps(NX_EXP_SHIFTER));
    __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(NX_EXP_SHIFTER));
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    __m256 r;
    if (accurate) { /* r = (x - n*LN2_HI) + (lo - n*LN2_LO); the first difference is exact */
        __m256 c = _mm256_fnmadd_ps(n, _mm256_set1_ps(NX_LN2_LO), lo);
        r = _mm256_add_ps(_mm256_fnmadd_ps(n, _mm256_set1_ps(NX_LN2_HI), xc), c);
    } else { /* one rounded ln2: |n| <= 127 makes that an error below 2e-7 */
        r = neg ? _mm256_fnmsub_ps(n, _mm256_set1_ps(NX_LN2), xc) : _mm256_fnmadd_ps(n, _mm256_set1_ps(NX_LN2), xc);
    }
    __m256 r2 = _mm256_mul_ps(r, r), p;
    if (accurate) {
        __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P4), r, _mm256_set1_ps(NX_EXP_P5));
        __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P2), r, _mm256_set1_ps(NX_EXP_P3));
        __m256 d = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P0), r, _mm256_set1_ps(NX_EXP_P1));
        p = _mm256_fmadd_ps(_mm256_fmadd_ps(d, r2, b), r2, a);
    } else {
        __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_Q2), r, _mm256_set1_ps(NX_EXP_Q3));
        __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_Q0), r, _mm256_set1_ps(NX_EXP_Q1));
        p = _mm256_fmadd_ps(b, r2, a);
    }
    __m256 y = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r2, r), s, s);
    if (accurate) {
        if (!nonpos)
            y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(NX_EXP_HI), _CMP_GT_OQ));
        y = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(NX_EXP_LO), _CMP_LT_OQ), y);
    }
    return y;
}

static inline NX_TARGET_AVX2 __m256 nx_exp_avx2(__m256 x) { return nx_exp_avx2_core(x, _mm256_setzero_ps(), 1, 0, 0); }
/* softmax: x <= 0 (or NaN) */
static inline NX_TARGET_AVX2 __m256 nx_exp_avx2_hl(__m256 x, __m256 lo) { return nx_exp_avx2_core(x, lo, 1, 1, 0); }
static inline NX_TARGET_AVX2 __m256 nx_exp_avx2_act(__m256 x) { return nx_exp_avx2_core(x, _mm256_setzero_ps(), 0, 0, 0); }
/* exp(-x) for the activations */
static inline NX_TARGET_AVX2 __m256 nx_expneg_avx2_act(__m256 x) { return nx_exp_avx2_core(x, _mm256_setzero_ps(), 0, 0, 1); }
#endif

#if NX_HAVE_NEON
static inline float32x4_t nx_exp_neon_core(float32x4_t x, float32x4_t lo, int accurate)
{
    /* vmin/vmax propagate NaN, so NaN survives the clamp. */
    float32x4_t xc = vminq_f32(vmaxq_f32(x, vdupq_n_f32(NX_EXP_LO)), vdupq_n_f32(NX_EXP_HI));
    float32x4_t t = vfmaq_f32(vdupq_n_f32(NX_EXP_SHIFTER), xc, vdupq_n_f32(NX_LOG2E));
    float32x4_t n = vsubq_f32(t, vdupq_n_f32(NX_EXP_SHIFTER));
    float32x4_t r = vfmsq_f32(xc, n, vdupq_n_f32(NX_LN2_HI));
    r = vfmsq_f32(r, n, vdupq_n_f32(NX_LN2_LO));
    float32x4_t p;
    if (accurate) {
        r = vaddq_f32(r, lo);
        p = vdupq_n_f32(NX_EXP_P0);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_P1), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_P2), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_P3), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_P4), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_P5), p, r);
    } else {
        p = vdupq_n_f32(NX_EXP_Q0);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_Q1), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_Q2), p, r);
        p = vfmaq_f32(vdupq_n_f32(NX_EXP_Q3), p, r);
    }
    float32x4_t y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0f));
    y = vmulq_f32(y, vreinterpretq_f32_s32(vshlq_n_s32(vreinterpretq_s32_f32(t), 23)));
    if (accurate) {
        y = vbslq_f32(vcgtq_f32(x, vdupq_n_f32(NX_EXP_HI)), vdupq_n_f32(INFINITY), y);
        y = vbslq_f32(vcltq_f32(x, vdupq_n_f32(NX_EXP_LO)), vdupq_n_f32(0.0f), y);
    }
    return y;
}

static inline float32x4_t nx_exp_neon(float32x4_t x) { return nx_exp_neon_core(x, vdupq_n_f32(0.0f), 1); }
static inline float32x4_t nx_exp_neon_hl(float32x4_t x, float32x4_t lo) { return nx_exp_neon_core(x, lo, 1); }
static inline float32x4_t nx_exp_neon_act(float32x4_t x) { return nx_exp_neon_core(x, vdupq_n_f32(0.0f), 0); }
#endif

#endif
