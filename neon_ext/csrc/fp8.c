/* FP8 quantise/dequantise with a per-tensor scale (OCP E4M3 "fn" and E5M2).
 *
 * Quantise works on the float32 bit pattern: normal values round their 23-bit
 * mantissa to M bits with round-to-nearest-even (add 0x7ff.. plus the lowest kept
 * bit; a carry moves into the exponent), then rebias the exponent.  Values below
 * the smallest normal are multiplied by 2^(bias+M-1) (exact) and rounded to an
 * integer, which is the subnormal code; 2^M rounds to the smallest normal code,
 * so the two ranges join.  |v| >= max saturates to the largest finite code (also
 * for inf); NaN gives the NaN code 0x7F with its sign.
 *
 * Dequantise on the SIMD paths goes through IEEE half precision, whose
 * conversion instructions handle subnormals and specials: E5M2 is exactly the
 * top byte of a half, and E4M3 shifted into a half's exponent/mantissa fields is
 * its value times 2^-8 (folded into the scale); only E4M3's NaN needs fixing. */
#include "nx_kernels.h"

typedef struct {
    uint32_t mbits;      /* mantissa bits */
    uint32_t bias;       /* exponent bias */
    uint32_t max_code;   /* largest finite magnitude code */
    uint32_t max_f32;    /* float32 bits of that value */
    uint32_t min_normal; /* float32 bits of the smallest normal */
    float sub_scale;     /* 2^(bias + mbits - 1): |v| to subnormal code */
} fp8_fmt;

static const fp8_fmt FMT[2] = {
    /* E4M3fn: max 448, no inf, NaN = S.1111.111 */
    {3, 7, 0x7E, 0x43E00000u, 0x3C800000u, 512.0f},
    /* E5M2: max 57344, inf = S.11111.00, NaN = S.11111.mm */
    {2, 15, 0x7B, 0x47600000u, 0x38800000u, 65536.0f},
};

/* ---- portable C ---- */

static inline uint8_t quant1(float v, const fp8_fmt *f)
{
    uint32_t u = nx_f2u(v), a = u & 0x7FFFFFFFu, sign = (u >> 24) & 0x80u, code;
    const uint32_t shift = 23 - f->mbits;
    if (a > 0x7F800000u) {
        code = 0x7F;
    } else if (a >= f->max_f32) {
        code = f->max_code;
    } else if (a < f->min_normal) {
        /* Adding and subtracting 1.5 * 2^23 rounds to the nearest even integer. */
        code = (uint32_t)((nx_u2f(a) * f->sub_scale + 12582912.0f) - 12582912.0f);
    } else {
        uint32_t r = a + ((1u << (shift - 1)) - 1) + ((a >> shift) & 1);
        code = (r >> shift) - ((127 - f->bias) << f->mbits);
    }
    return (uint8_t)(sign | code);
}

static inline float dequant1(uint8_t b, const fp8_fmt *f)
{
    const uint32_t emax = (1u << (7 - f->mbits)) - 1, mmask = (1u << f->mbits) - 1;
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t e = (b & 0x7Fu) >> f->mbits, m = b & mmask;
    if (e == 0) /* subnormal: m * 2^(1 - bias - mbits) */
        return nx_u2f(sign | nx_f2u((float)m / f->sub_scale));
    if (e == emax && (f->mbits == 2 || m == mmask)) /* E5M2 inf/NaN, E4M3 NaN */
        return nx_u2f(sign | 0x7F800000u | (m ? 0x400000u : 0));
    return nx_u2f(sign | ((e + 127 - f->bias) << 23) | (m << (23 - f->mbits)));
}

static void quant_scalar(const float *x, uint8_t *q, size_t n, float scale, const fp8_fmt *f)
{
    for (size_t i = 0; i < n; i++) q[i] = quant1(x[i] / scale, f);
}

static void dequant_scalar(const uint8_t *q, float *x, size_t n, float scale, const fp8_fmt *f)
{
    for (size_t i = 0; i < n; i++) x[i] = dequant1(q[i], f) * scale;
}

/* ---- AVX2 (F16C is part of the AVX2 path, see nx_common.h) ---- */
#if NX_HAVE_AVX2
/* 8 codes as int32 lanes; mbits/bias are constants after inlining, so the shifts
 * take immediates.  Saturation is a min (the rounded normal code only grows with
 * |v|, inf included); the subnormal range and NaN are blended in. */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) __m256i
quant8_avx2(__m256 v, const int mbits, const int bias, const fp8_fmt *f)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(a, 23 - mbits), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32((1 << (22 - mbits)) - 1)), lsb);
    __m256i code = _mm256_sub_epi32(_mm256_srli_epi32(r, 23 - mbits), _mm256_set1_epi32((127 - bias) << mbits));
    code = _mm256_min_epi32(code, _mm256_set1_epi32((int)f->max_code));
    __m256 sub = _mm256_round_ps(_mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(f->sub_scale)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    code = _mm256_blendv_epi8(code, _mm256_cvtps_epi32(sub), _mm256_cmpgt_epi32(_mm256_set1_epi32((int)f->min_normal), a));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000)));
    return _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
}

static inline NX_TARGET_AVX2 __attribute__((always_inline)) void
quant_avx2_fmt(const float *x, uint8_t *q, size_t n, float scale, const int mbits, const int bias, const fp8_fmt *f)
{
    const __m256 vs = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i c0 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), mbits, bias, f);
        __m256i c1 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(x + i + 8), vs), mbits, bias, f);
        __m256i c2 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(x + i + 16), vs), mbits, bias, f);
        __m256i c3 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(x + i + 24), vs), mbits, bias, f);
        /* 32 x int32 (each < 256) -> 32 bytes; the packs work per 128-bit lane, the
         * permute puts the four 8-byte groups back in order */
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    quant_scalar(x + i, q + i, n - i, scale, f);
}

static NX_TARGET_AVX2 void quant_avx2(const float *x, uint8_t *q, size_t n, float scale, const fp8_fmt *f)
{
    if (f->mbits == 3) quant_avx2_fmt(x, q, n, scale, 3, 7, f);
    else quant_avx2_fmt(x, q, n, scale, 2, 15, f);
}

/* 16 codes, each in the high byte of a 16-bit lane, as half-precision bit patterns.
 * E5M2 is the top byte of a half already.  For E4M3 an arithmetic shift right by one
 * keeps the sign in bit 15 and puts the magnitude in bits 13..7 (the value times 2^-8,
 * folded into the scale); the copy of the sign in bit 14 is cleared, and the NaN
 * magnitude 0x7F, now 0x3F80, gets the half NaN exponent (sign kept). */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) __m256i fp8_to_half_avx2(__m256i b, const int e4m3)
{
    if (!e4m3) return b;
    __m256i h = _mm256_and_si256(_mm256_srai_epi16(b, 1), _mm256_set1_epi16((short)0xBFFF));
    __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x3F80));
    return _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7E00)));
}

static inline NX_TARGET_AVX2 __attribute__((always_inline)) void
dequant_avx2_fmt(const uint8_t *q, float *x, size_t n, float scale, const fp8_fmt *f, const int e4m3)
{
    const __m256 vscale = _mm256_set1_ps(e4m3 ? scale * 256.0f : scale);
    const __m256i zero = _mm256_setzero_si256();
    size_t i = 0;
    /* 32 codes per step.  Unpacking bytes against zero puts each code in the high byte
     * of a 16-bit lane, per 128-bit half: codes 0-7 and 16-23 from the low unpack, 8-15
     * and 24-31 from the high one; the stores put them back in order.  The multiply by
     * the scale keeps NaN. */
    for (; i + 32 <= n; i += 32) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(q + i));
        __m256i h0 = fp8_to_half_avx2(_mm256_unpacklo_epi8(zero, b), e4m3);
        __m256i h1 = fp8_to_half_avx2(_mm256_unpackhi_epi8(zero, b), e4m3);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h0)), vscale));
        _mm256_storeu_ps(x + i + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h1)), vscale));
        _mm256_storeu_ps(x + i + 16, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1)), vscale));
        _mm256_storeu_ps(x + i + 24, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1)), vscale));
    }
    dequant_scalar(q + i, x + i, n - i, scale, f);
}

static NX_TARGET_AVX2 void dequant_avx2(const uint8_t *q, float *x, size_t n, float scale, const fp8_fmt *f)
{
    if (f->mbits == 3) dequant_avx2_fmt(q, x, n, scale, f, 1);
    else dequant_avx2_fmt(q, x, n, scale, f, 0);
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
static uint16x4_t quant4_neon(float32x4_t v, const fp8_fmt *f)
{
    const int32x4_t rshift = vdupq_n_s32(-(int)(23 - f->mbits)); /* negative: shift right */
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t a = vandq_u32(u, vdupq_n_u32(0x7FFFFFFFu));
    uint32x4_t lsb = vandq_u32(vshlq_u32(a, rshift), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(a, vdupq_n_u32((1u << (22 - f->mbits)) - 1)), lsb);
    uint32x4_t code = vsubq_u32(vshlq_u32(r, rshift), vdupq_n_u32((127 - f->bias) << f->mbits));
    uint32x4_t sub = vreinterpretq_u32_s32(vcvtnq_s32_f32(vmulq_n_f32(vreinterpretq_f32_u32(a), f->sub_scale)));
    code = vminq_u32(code, vdupq_n_u32(f->max_code)); /* subnormal lanes may wrap; replaced next */
    code = vbslq_u32(vcltq_u32(a, vdupq_n_u32(f->min_normal)), sub, code);
    code = vbslq_u32(vcgtq_u32(a, vdupq_n_u32(0x7F800000u)), vdupq_n_u32(0x7F), code);
    return vmovn_u32(vorrq_u32(code, vandq_u32(vshrq_n_u32(u, 24), vdupq_n_u32(0x80))));
}

static void quant_neon(const float *x, uint8_t *q, size_t n, float scale, const fp8_fmt *f)
{
    const float32x4_t vscale = vdupq_n_f32(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x4_t lo = quant4_neon(vdivq_f32(vld1q_f32(x + i), vscale), f);
        uint16x4_t hi = quant4_neon(vdivq_f32(vld1q_f32(x + i + 4), vscale), f);
        vst1_u8(q + i, vmovn_u16(vcombine_u16(lo, hi)));
    }
    quant_scalar(x + i, q + i, n - i, scale, f);
}

static void dequant_neon(const uint8_t *q, float *x, size_t n, float scale, const fp8_fmt *f)
{
    const int e4m3 = f->mbits == 3;
    const float s = e4m3 ? scale * 256.0f : scale;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t b = vmovl_u8(vld1_u8(q + i));
        uint16x8_t h = e4m3 ? vorrq_u16(vshlq_n_u16(vandq_u16(b, vdupq_n_u16(0x80)), 8),
                                        vshlq_n_u16(vandq_u16(b, vdupq_n_u16(0x7F)), 7))
                            : vshlq_n_u16(b, 8);
        float16x8_t hf = vreinterpretq_f16_u16(h);
        float32x4_t lo = vmulq_n_f32(vcvt_f32_f16(vget_low_f16(hf)), s);
        float32x4_t hi = vmulq_n_f32(vcvt_high_f32_f16(hf), s);
        if (e4m3) {
            /* sign-extend the 16-bit NaN mask to 32-bit lanes */
            int16x8_t nan16 = vreinterpretq_s16_u16(vceqq_u16(vandq_u16(b, vdupq_n_u16(0x7F)), vdupq_n_u16(0x7F)));
            const uint32x4_t qnan = vdupq_n_u32(0x7FC00000); /* or-ed in, keeps the sign */
            lo = vbslq_f32(vreinterpretq_u32_s32(vmovl_s16(vget_low_s16(nan16))),
                           vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(lo), qnan)), lo);
            hi = vbslq_f32(vreinterpretq_u32_s32(vmovl_high_s16(nan16)),
                           vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(hi), qnan)), hi);
        }
        vst1q_f32(x + i, lo);
        vst1q_f32(x + i + 4, hi);
    }
    dequant_scalar(q + i, x + i, n - i, scale, f);
}
#endif

void nx_fp8_quantize(nx_path p, const float *x, uint8_t *q, size_t n, float scale, int fmt)
{
    const fp8_fmt *f = &FMT[fmt == NX_FP8_E5M2];
#if NX_HAVE_AVX2
    if (p == NX_AVX2) { quant_avx2(x, q, n, scale, f); return; }
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) { quant_neon(x, q, n, scale, f); return; }
#endif
    (void)p;
    quant_scalar(x, q, n, scale, f);
}

void nx_fp8_dequantize(nx_path p, const uint8_t *q, float *x, size_t n, float scale, int fmt)
{
    const fp8_fmt *f = &FMT[fmt == NX_FP8_E5M2];
#if NX_HAVE_AVX2
    if (p == NX_AVX2) { dequant_avx2(q, x, n, scale, f); return; }
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) { dequant_neon(q, x, n, scale, f); return; }
#endif
    (void)p;
    dequant_scalar(q, x, n, scale, f);
}
