/* RMSNorm and the fused residual-add variant used between transformer blocks.
 *
 * One pass accumulates the sum of squares (the fused variant also stores
 * x + residual back into residual there), a second pass scales by
 * 1/sqrt(mean + eps) and the weight.  A row of an LLM hidden state (<= 16 KiB)
 * stays in L1/L2 between the two passes, so the kernel reads and writes each
 * element once from memory. */
#include <math.h>
#include "nx_kernels.h"

typedef void (*row_fn)(const float *x, float *res, const float *w, float *y, size_t d, float eps);

static float inv_rms(double ss, size_t d, float eps)
{
    return (float)(1.0 / sqrt(ss / (double)d + (double)eps));
}

/* ---- portable C ---- */

static void row_scalar(const float *x, float *res, const float *w, float *y, size_t d, float eps)
{
    double ss = 0.0;
    if (res) {
        for (size_t i = 0; i < d; i++) {
            float s = x[i] + res[i];
            res[i] = s;
            ss += (double)s * s;
        }
        x = res;
    } else {
        for (size_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    }
    float inv = inv_rms(ss, d, eps);
    for (size_t i = 0; i < d; i++) y[i] = x[i] * inv * w[i];
}

/* ---- AVX2 / FMA ---- */
#if NX_HAVE_AVX2
static NX_TARGET_AVX2 float hsum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static NX_TARGET_AVX2 void row_avx2(const float *x, float *res, const float *w, float *y, size_t d, float eps)
{
    /* Four accumulators hide the FMA latency and keep each partial sum short. */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    if (res) {
        for (; i + 16 <= d; i += 16) {
            __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(res + i));
            __m256 s1 = _mm256_add_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(res + i + 8));
            _mm256_storeu_ps(res + i, s0);
            _mm256_storeu_ps(res + i + 8, s1);
            a0 = _mm256_fmadd_ps(s0, s0, a0);
            a1 = _mm256_fmadd_ps(s1, s1, a1);
        }
        for (; i + 8 <= d; i += 8) {
            __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(res + i));
            _mm256_storeu_ps(res + i, s0);
            a2 = _mm256_fmadd_ps(s0, s0, a2);
        }
    } else {
        for (; i + 32 <= d; i += 32) {
            __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
            __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
            a2 = _mm256_fmadd_ps(v2, v2, a2);
            a3 = _mm256_fmadd_ps(v3, v3, a3);
        }
        for (; i + 8 <= d; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(v, v, a0);
        }
    }
    double ss = hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < d; i++) {
        float v = res ? (res[i] = x[i] + res[i]) : x[i];
        ss += (double)v * v;
    }
    if (res) x = res;

    const __m256 vinv = _mm256_set1_ps(inv_rms(ss, d, eps));
    for (i = 0; i + 8 <= d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(w + i)));
    for (; i < d; i++) y[i] = x[i] * _mm256_cvtss_f32(vinv) * w[i];
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
static void row_neon(const float *x, float *res, const float *w, float *y, size_t d, float eps)
{
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    if (res) {
        for (; i + 8 <= d; i += 8) {
            float32x4_t s0 = vaddq_f32(vld1q_f32(x + i), vld1q_f32(res + i));
            float32x4_t s1 = vaddq_f32(vld1q_f32(x + i + 4), vld1q_f32(res + i + 4));
            vst1q_f32(res + i, s0);
            vst1q_f32(res + i + 4, s1);
            a0 = vfmaq_f32(a0, s0, s0);
            a1 = vfmaq_f32(a1, s1, s1);
        }
        for (; i + 4 <= d; i += 4) {
            float32x4_t s0 = vaddq_f32(vld1q_f32(x + i), vld1q_f32(res + i));
            vst1q_f32(res + i, s0);
            a2 = vfmaq_f32(a2, s0, s0);
        }
    } else {
        for (; i + 16 <= d; i += 16) {
            float32x4_t v0 = vld1q_f32(x + i), v1 = vld1q_f32(x + i + 4);
            float32x4_t v2 = vld1q_f32(x + i + 8), v3 = vld1q_f32(x + i + 12);
            a0 = vfmaq_f32(a0, v0, v0);
            a1 = vfmaq_f32(a1, v1, v1);
            a2 = vfmaq_f32(a2, v2, v2);
            a3 = vfmaq_f32(a3, v3, v3);
        }
        for (; i + 4 <= d; i += 4) {
            float32x4_t v = vld1q_f32(x + i);
            a0 = vfmaq_f32(a0, v, v);
        }
    }
    double ss = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < d; i++) {
        float v = res ? (res[i] = x[i] + res[i]) : x[i];
        ss += (double)v * v;
    }
    if (res) x = res;

    const float inv = inv_rms(ss, d, eps);
    for (i = 0; i + 4 <= d; i += 4)
        vst1q_f32(y + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), inv), vld1q_f32(w + i)));
    for (; i < d; i++) y[i] = x[i] * inv * w[i];
}
#endif

static row_fn pick(nx_path p)
{
#if NX_HAVE_AVX2
    if (p == NX_AVX2) return row_avx2;
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) return row_neon;
#endif
    (void)p;
    return row_scalar;
}

void nx_rmsnorm(nx_path p, const float *x, ptrdiff_t x_rs, const float *w,
                float *y, ptrdiff_t y_rs, size_t rows, size_t d, float eps)
{
    row_fn row = pick(p);
    for (size_t r = 0; r < rows; r++)
        row(x + (ptrdiff_t)r * x_rs, NULL, w, y + (ptrdiff_t)r * y_rs, d, eps);
}

void nx_fused_add_rmsnorm(nx_path p, const float *x, ptrdiff_t x_rs, float *res, ptrdiff_t r_rs,
                          const float *w, float *y, ptrdiff_t y_rs, size_t rows, size_t d, float eps)
{
    row_fn row = pick(p);
    for (size_t r = 0; r < rows; r++)
        row(x + (ptrdiff_t)r * x_rs, res + (ptrdiff_t)r * r_rs, w, y + (ptrdiff_t)r * y_rs, d, eps);
}
