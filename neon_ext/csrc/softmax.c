/* exp and numerically stable row softmax.
 *
 * softmax(s*x)_j = exp(s*x_j - m) / sum_k exp(s*x_k - m) with m = max_k s*x_k, so
 * every exp argument is <= 0 and nothing overflows.  Three passes per row (max,
 * exp + sum, scale).  The exp argument x*scale - m carries its rounding error
 * (exact product error by FMA, subtraction error by TwoSum) into the exp as a
 * low part, and the row sum is accumulated in double (on AVX2 from short float
 * partial sums, see softmax_row_avx2_body), so every output stays
 * within about 1e-6 relative of the exact softmax for any row length and range. */
#include "nx_kernels.h"
#include "nx_vexp.h"

/* ---- portable C ---- */

static void exp_scalar(const float *x, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++) y[i] = nx_exp_scalar(x[i]);
}

/* exp(x*scale - m) to within the 1e-6 budget: the float product is exact in double and
 * the difference is rounded once, its error passed to the exp as the low part. */
static inline float exp_shifted_scalar(float x, float scale, float m)
{
    double z = (double)x * scale - m;
    float zh = (float)z;
    return nx_exp_scalar_hl(zh, (float)(z - zh));
}

static void softmax_row_scalar(const float *x, float *y, size_t len, float scale)
{
    float m = -INFINITY;
    for (size_t i = 0; i < len; i++) {
        float v = x[i] * scale;
        m = v > m ? v : m;
    }
    double sum = 0.0;
    for (size_t i = 0; i < len; i++) sum += y[i] = exp_shifted_scalar(x[i], scale, m);
    float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < len; i++) y[i] *= inv;
}

/* ---- AVX2 / FMA ---- */
#if NX_HAVE_AVX2
static NX_TARGET_AVX2 void exp_avx2(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, nx_exp_avx2(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = nx_exp_scalar(x[i]);
}

static NX_TARGET_AVX2 float hmax_avx2(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* exp(z + lo) for -16 < z <= 0 (lo: a tiny correction, used when has_lo), which is all
 * the non-exact softmax path needs: no clamps or special cases, and one rounded ln2
 * (|n| <= 24 keeps that error below 5e-8). */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) __m256 exp_bounded_avx2(__m256 z, __m256 lo, const int has_lo)
{
    __m256 t = _mm256_fmadd_ps(z, _mm256_set1_ps(NX_LOG2E), _mm256_set1_ps(NX_EXP_SHIFTER));
    __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(NX_EXP_SHIFTER));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(NX_LN2), z);
    if (has_lo) r = _mm256_add_ps(r, lo);
    __m256 r2 = _mm256_mul_ps(r, r);
    __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P4), r, _mm256_set1_ps(NX_EXP_P5));
    __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P2), r, _mm256_set1_ps(NX_EXP_P3));
    __m256 d = _mm256_fmadd_ps(_mm256_set1_ps(NX_EXP_P0), r, _mm256_set1_ps(NX_EXP_P1));
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    return _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(d, r2, b), r2, a), r2, r), s, s);
}

/* exp(x*scale - m) into y, their sum returned.  unit (scale == 1, the common case) and
 * exact_z are constants after inlining.  unit: the products are exact, so their
 * multiply and error term drop out.  exact_z: z = p - m carries its rounding error
 * (TwoSum) into the exp; without it that error is at most half an ulp of |z|, which
 * the caller allows only when every |z| < 16 (4.8e-7 relative, inside the 1e-6 budget). */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) double
softmax_exp_sum_avx2(const float *x, float *y, size_t len, float scale, float m, const int unit, const int exact_z)
{
    const __m256 vs = _mm256_set1_ps(scale), vmax = _mm256_set1_ps(m), vnegmax = _mm256_set1_ps(-m);
/* exp(x[j]*scale - m) for 8 lanes at j, stored to y[j] */
#define SOFTMAX_EXP8(j, e)                                                                                  \
    do {                                                                                                    \
        __m256 xv = _mm256_loadu_ps(x + (j));                                                               \
        __m256 p = unit ? xv : _mm256_mul_ps(xv, vs);                                                       \
        __m256 z = _mm256_sub_ps(p, vmax), z_lo = _mm256_setzero_ps();                                      \
        if (exact_z) {                                                                                      \
            __m256 t = _mm256_sub_ps(z, p);                                                                 \
            z_lo = _mm256_add_ps(_mm256_sub_ps(p, _mm256_sub_ps(z, t)), _mm256_sub_ps(vnegmax, t));         \
        }                                                                                                   \
        if (!unit) z_lo = _mm256_add_ps(z_lo, _mm256_fmsub_ps(xv, vs, p));                                  \
        e = exact_z ? nx_exp_avx2_hl(z, z_lo) /* z <= 0: p <= max */                                        \
                    : exp_bounded_avx2(z, z_lo, !unit);                                                     \
        _mm256_storeu_ps(y + (j), e);                                                                       \
    } while (0)
    /* The row sum: each float accumulator takes at most 4 vectors of terms in (0, 1]
     * (3 roundings, <= 1.8e-7 relative) before it is flushed into double, which keeps
     * the output within the 1e-6 budget for any row length at a fraction of the cost
     * of converting every vector to double. */
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    const size_t len8 = len & ~(size_t)7;
    size_t i = 0;
    while (i < len8) {
        const size_t end = len8 - i > 64 ? i + 64 : len8;
        __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps(), e0, e1;
        for (; i + 16 <= end; i += 16) {
            SOFTMAX_EXP8(i, e0);
            SOFTMAX_EXP8(i + 8, e1);
            f0 = _mm256_add_ps(f0, e0);
            f1 = _mm256_add_ps(f1, e1);
        }
        if (i < end) {
            SOFTMAX_EXP8(i, e0);
            f1 = _mm256_add_ps(f1, e0); /* an odd count is <= 7: f1 still gets <= 4 */
            i += 8;
        }
        s0 = _mm256_add_pd(s0, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f0)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(f0, 1))));
        s1 = _mm256_add_pd(s1, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f1)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(f1, 1))));
    }
#undef SOFTMAX_EXP8
    double part[4];
    _mm256_storeu_pd(part, _mm256_add_pd(s0, s1));
    double sum = (part[0] + part[1]) + (part[2] + part[3]);
    for (; i < len; i++) sum += y[i] = exp_shifted_scalar(x[i], scale, m);
    return sum;
}

static NX_TARGET_AVX2 void softmax_row_avx2(const float *x, float *y, size_t len, float scale)
{
    const int unit = scale == 1.0f;
    const __m256 vs = _mm256_set1_ps(scale);
    size_t i = 0;
    /* four running maxima and minima, so the loop is bound by loads rather than by latency */
    __m256 vm0 = _mm256_set1_ps(-INFINITY), vm1 = vm0, vm2 = vm0, vm3 = vm0;
    __m256 vn0 = _mm256_set1_ps(INFINITY), vn1 = vn0, vn2 = vn0, vn3 = vn0;
#define SOFTMAX_LOAD(j) (unit ? _mm256_loadu_ps(x + (j)) : _mm256_mul_ps(_mm256_loadu_ps(x + (j)), vs))
    for (; i + 32 <= len; i += 32) {
        __m256 a = SOFTMAX_LOAD(i), b = SOFTMAX_LOAD(i + 8), c = SOFTMAX_LOAD(i + 16), d = SOFTMAX_LOAD(i + 24);
        vm0 = _mm256_max_ps(vm0, a), vn0 = _mm256_min_ps(vn0, a);
        vm1 = _mm256_max_ps(vm1, b), vn1 = _mm256_min_ps(vn1, b);
        vm2 = _mm256_max_ps(vm2, c), vn2 = _mm256_min_ps(vn2, c);
        vm3 = _mm256_max_ps(vm3, d), vn3 = _mm256_min_ps(vn3, d);
    }
    for (; i + 8 <= len; i += 8) {
        __m256 a = SOFTMAX_LOAD(i);
        vm0 = _mm256_max_ps(vm0, a), vn0 = _mm256_min_ps(vn0, a);
    }
#undef SOFTMAX_LOAD
    float m = hmax_avx2(_mm256_max_ps(_mm256_max_ps(vm0, vm1), _mm256_max_ps(vm2, vm3)));
    float mn = -hmax_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_min_ps(_mm256_min_ps(vn0, vn1), _mm256_min_ps(vn2, vn3))));
    for (; i < len; i++) {
        float v = x[i] * scale;
        m = v > m ? v : m;
        mn = v < mn ? v : mn;
    }
    /* false for NaN and infinities, which take the exact path */
    const int exact_z = !((double)m - (double)mn < 16.0);
    double sum = unit ? (exact_z ? softmax_exp_sum_avx2(x, y, len, 1.0f, m, 1, 1) : softmax_exp_sum_avx2(x, y, len, 1.0f, m, 1, 0))
                      : (exact_z ? softmax_exp_sum_avx2(x, y, len, scale, m, 0, 1) : softmax_exp_sum_avx2(x, y, len, scale, m, 0, 0));
    const __m256 vinv = _mm256_set1_ps((float)(1.0 / sum));
    for (i = 0; i + 8 <= len; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), vinv));
    for (; i < len; i++) y[i] *= _mm256_cvtss_f32(vinv);
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
static void exp_neon(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, nx_exp_neon(vld1q_f32(x + i)));
    for (; i < n; i++) y[i] = nx_exp_scalar(x[i]);
}

static void softmax_row_neon(const float *x, float *y, size_t len, float scale)
{
    size_t i = 0;
    float32x4_t vm = vdupq_n_f32(-INFINITY);
    for (; i + 4 <= len; i += 4) vm = vmaxq_f32(vm, vmulq_n_f32(vld1q_f32(x + i), scale));
    float m = vmaxvq_f32(vm);
    for (; i < len; i++) {
        float v = x[i] * scale;
        m = v > m ? v : m;
    }

    const float32x4_t vmax = vdupq_n_f32(m), vnegmax = vdupq_n_f32(-m), vs = vdupq_n_f32(scale);
    float64x2_t s0 = vdupq_n_f64(0.0), s1 = vdupq_n_f64(0.0);
    for (i = 0; i + 4 <= len; i += 4) {
        float32x4_t xv = vld1q_f32(x + i);
        float32x4_t p = vmulq_f32(xv, vs), p_lo = vfmaq_f32(vnegq_f32(p), xv, vs);
        float32x4_t z = vsubq_f32(p, vmax), t = vsubq_f32(z, p);
        float32x4_t z_lo = vaddq_f32(vsubq_f32(p, vsubq_f32(z, t)), vsubq_f32(vnegmax, t));
        float32x4_t e = nx_exp_neon_hl(z, vaddq_f32(z_lo, p_lo));
        vst1q_f32(y + i, e);
        s0 = vaddq_f64(s0, vcvt_f64_f32(vget_low_f32(e)));
        s1 = vaddq_f64(s1, vcvt_high_f64_f32(e));
    }
    double sum = vaddvq_f64(vaddq_f64(s0, s1));
    for (; i < len; i++) sum += y[i] = exp_shifted_scalar(x[i], scale, m);

    const float inv = (float)(1.0 / sum);
    for (i = 0; i + 4 <= len; i += 4) vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(y + i), inv));
    for (; i < len; i++) y[i] *= inv;
}
#endif

void nx_exp(nx_path p, const float *x, float *y, size_t n)
{
#if NX_HAVE_AVX2
    if (p == NX_AVX2) { exp_avx2(x, y, n); return; }
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) { exp_neon(x, y, n); return; }
#endif
    (void)p;
    exp_scalar(x, y, n);
}

void nx_softmax(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                size_t rows, size_t cols, float scale, int causal, size_t q_rows)
{
    void (*row)(const float *, float *, size_t, float) = softmax_row_scalar;
#if NX_HAVE_AVX2
    if (p == NX_AVX2) row = softmax_row_avx2;
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) row = softmax_row_neon;
#endif
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + (ptrdiff_t)r * x_rs;
        float *yr = y + (ptrdiff_t)r * y_rs;
        size_t len = cols;
        if (causal) {
            /* Queries are the last q_rows positions of the cols keys. */
            ptrdiff_t lim = (ptrdiff_t)(r % q_rows) + (ptrdiff_t)cols - (ptrdiff_t)q_rows + 1;
            len = lim <= 0 ? 0 : (size_t)lim < cols ? (size_t)lim : cols;
        }
        if (len > 0) row(xr, yr, len, scale);
        for (size_t j = len; j < cols; j++) yr[j] = 0.0f;
    }
}
