/* Rotary position embedding, in place, for the NeoX and GPT-J layouts.
 *
 * For each token the cos/sin row (cos half, then sin half, as in vLLM's
 * cos_sin_cache) is taken from the cache or computed from theta the way vLLM
 * builds its cache (float32 inv_freq, float32 angle), then applied to every
 * head of q and k:
 *   NeoX : pairs (x[i], x[i + rot/2])      GPT-J : pairs (x[2i], x[2i + 1])
 *   o1 = x1 * cos - x2 * sin,  o2 = x2 * cos + x1 * sin
 * Products are rounded separately (no FMA) so the result matches vLLM's
 * reference implementation bit for bit given the same cos/sin.
 * GPT-J heads use per-token interleaved copies cd = (c0, c0, c1, c1, ...) and
 * sd = (-s0, s0, -s1, s1, ...) so that o = x * cd + swap_pairs(x) * sd. */
#include <math.h>
#include <stdlib.h>
#include "nx_kernels.h"

typedef void (*neox_fn)(float *x, const float *c, const float *s, size_t half);
typedef void (*gptj_fn)(float *x, const float *cd, const float *sd, size_t rot);

/* ---- portable C ---- */

static void neox_scalar(float *x, const float *c, const float *s, size_t half)
{
    for (size_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c[i] - x2 * s[i];
        x[half + i] = x2 * c[i] + x1 * s[i];
    }
}

static void gptj_scalar(float *x, const float *cd, const float *sd, size_t rot)
{
    for (size_t i = 0; i < rot; i += 2) {
        float x1 = x[i], x2 = x[i + 1];
        x[i] = x1 * cd[i] + x2 * sd[i];
        x[i + 1] = x2 * cd[i + 1] + x1 * sd[i + 1];
    }
}

/* ---- AVX2 ---- */
#if NX_HAVE_AVX2
static NX_TARGET_AVX2 void neox_avx2(float *x, const float *c, const float *s, size_t half)
{
    size_t i = 0;
    for (; i + 8 <= half; i += 8) {
        __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
        __m256 vc = _mm256_loadu_ps(c + i), vs = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(x1, vc), _mm256_mul_ps(x2, vs)));
        _mm256_storeu_ps(x + half + i, _mm256_add_ps(_mm256_mul_ps(x2, vc), _mm256_mul_ps(x1, vs)));
    }
    for (; i < half; i++) {
        float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c[i] - x2 * s[i];
        x[half + i] = x2 * c[i] + x1 * s[i];
    }
}

static NX_TARGET_AVX2 void gptj_avx2(float *x, const float *cd, const float *sd, size_t rot)
{
    size_t i = 0;
    for (; i + 8 <= rot; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 sw = _mm256_permute_ps(v, 0xB1); /* swap neighbours */
        _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(cd + i)),
                                              _mm256_mul_ps(sw, _mm256_loadu_ps(sd + i))));
    }
    gptj_scalar(x + i, cd + i, sd + i, rot - i);
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
static void neox_neon(float *x, const float *c, const float *s, size_t half)
{
    size_t i = 0;
    for (; i + 4 <= half; i += 4) {
        float32x4_t x1 = vld1q_f32(x + i), x2 = vld1q_f32(x + half + i);
        float32x4_t vc = vld1q_f32(c + i), vs = vld1q_f32(s + i);
        vst1q_f32(x + i, vsubq_f32(vmulq_f32(x1, vc), vmulq_f32(x2, vs)));
        vst1q_f32(x + half + i, vaddq_f32(vmulq_f32(x2, vc), vmulq_f32(x1, vs)));
    }
    for (; i < half; i++) {
        float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c[i] - x2 * s[i];
        x[half + i] = x2 * c[i] + x1 * s[i];
    }
}

static void gptj_neon(float *x, const float *cd, const float *sd, size_t rot)
{
    size_t i = 0;
    for (; i + 4 <= rot; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        float32x4_t sw = vrev64q_f32(v); /* swap neighbours */
        vst1q_f32(x + i, vaddq_f32(vmulq_f32(v, vld1q_f32(cd + i)), vmulq_f32(sw, vld1q_f32(sd + i))));
    }
    gptj_scalar(x + i, cd + i, sd + i, rot - i);
}
#endif

static void apply_heads(float *row, size_t heads, size_t head_size, int is_neox, size_t rot,
                        const float *c, const float *s, const float *cd, const float *sd,
                        neox_fn neox, gptj_fn gptj)
{
    for (size_t h = 0; h < heads; h++) {
        float *x = row + h * head_size;
        if (is_neox) neox(x, c, s, rot / 2);
        else gptj(x, cd, sd, rot);
    }
}

int nx_rope(nx_path p, const int64_t *pos, size_t ntok,
            float *q, ptrdiff_t q_rs, size_t q_heads, float *k, ptrdiff_t k_rs, size_t k_heads,
            size_t head_size, size_t rot_dim, int is_neox,
            const float *cache, size_t cache_rows, float theta)
{
    const size_t half = rot_dim / 2;
    if (cache)
        for (size_t t = 0; t < ntok; t++)
            if (pos[t] < 0 || (uint64_t)pos[t] >= cache_rows) return NX_ERANGE;

    neox_fn neox = neox_scalar;
    gptj_fn gptj = gptj_scalar;
#if NX_HAVE_AVX2
    if (p == NX_AVX2) { neox = neox_avx2; gptj = gptj_avx2; }
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) { neox = neox_neon; gptj = gptj_neon; }
#endif
    (void)p;

    /* Workspace: inv_freq [half], this token's cos|sin [rot], GPT-J cd and sd [rot each]. */
    float *ws = malloc(sizeof(float) * (half + 3 * rot_dim + 1));
    if (!ws) return NX_ENOMEM;
    float *inv_freq = ws, *cs = ws + half, *cd = cs + rot_dim, *sd = cd + rot_dim;
    if (!cache)
        for (size_t i = 0; i < half; i++)
            inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)rot_dim);

    for (size_t t = 0; t < ntok; t++) {
        const float *c, *s;
        if (cache) {
            c = cache + (size_t)pos[t] * rot_dim;
        } else {
            for (size_t i = 0; i < half; i++) {
                float a = (float)pos[t] * inv_freq[i];
                cs[i] = cosf(a);
                cs[half + i] = sinf(a);
            }
            c = cs;
        }
        s = c + half;
        if (!is_neox)
            for (size_t i = 0; i < half; i++) {
                cd[2 * i] = cd[2 * i + 1] = c[i];
                sd[2 * i] = -s[i];
                sd[2 * i + 1] = s[i];
            }
        apply_heads(q + (ptrdiff_t)t * q_rs, q_heads, head_size, is_neox, rot_dim, c, s, cd, sd, neox, gptj);
        if (k)
            apply_heads(k + (ptrdiff_t)t * k_rs, k_heads, head_size, is_neox, rot_dim, c, s, cd, sd, neox, gptj);
    }
    free(ws);
    return NX_OK;
}
