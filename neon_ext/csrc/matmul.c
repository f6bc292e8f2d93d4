/* FP32 matrix multiply C = A @ B (B optionally stored transposed, [N, K], as
 * linear-layer weights are).
 *
 * Large problems use the Goto/BLIS scheme: B is packed into KC x NR column
 * slivers (one KC x NC panel at a time), A into MR x KC row slivers (one MC x KC
 * block at a time), and a register-tiled micro-kernel computes each MR x NR tile
 * of C over KC with all accumulators in registers.  The blocks are sized so the
 * B sliver stays in L1 and the A block in L2 while they are reused.
 *   NEON   : 8 x 8 tile  (16 accumulators of 4 lanes, A broadcast by lane)
 *   AVX2   : 6 x 16 tile (12 accumulators of 8 lanes, 2 B loads + 6 broadcasts per k)
 *   scalar : 4 x 8 tile  (plain C the compiler can vectorise)
 * Partial tiles at the edges are computed in a local tile and copied out.
 *
 * Few rows (M <= 8, the decode case) make packing B a waste: every element of B
 * is used at most 8 times, so the SIMD paths stream B directly instead, reading
 * it once per group of rows with accumulators in registers. */
#include <stdlib.h>
#include "nx_kernels.h"

#define KC 256
#define NC 2048
#define SMALL_M 8

typedef void (*ukr_fn)(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                       int accumulate, size_t mr, size_t nr);

typedef struct {
    size_t mr, nr, mc;
    ukr_fn ukr;
} gemm_cfg;

/* Copy an mr x nr tile computed in tmp (row stride NR) into C. */
static void store_tile(const float *tmp, size_t ld_tmp, float *c, size_t ldc, int accumulate,
                       size_t mr, size_t nr)
{
    for (size_t i = 0; i < mr; i++)
        for (size_t j = 0; j < nr; j++)
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + tmp[i * ld_tmp + j] : tmp[i * ld_tmp + j];
}

/* ---- packing (shared by all paths) ---- */

/* A block [mc x kc] -> slivers of mr rows, k-major, zero padded to mr. */
static void pack_a(const float *a, size_t lda, size_t mc, size_t kc, size_t mr, float *ap)
{
    for (size_t i0 = 0; i0 < mc; i0 += mr, ap += mr * kc)
        for (size_t i = 0; i < mr; i++) {
            if (i0 + i < mc) {
                const float *row = a + (i0 + i) * lda;
                for (size_t k = 0; k < kc; k++) ap[k * mr + i] = row[k];
            } else {
                for (size_t k = 0; k < kc; k++) ap[k * mr + i] = 0.0f;
            }
        }
}

/* B [N, K] (trans_b): one sliver, nr rows of the stored matrix (w of them real,
 * the rest zero), each read contiguously, written k-major. */
static void pack_b_rows(const float *b, size_t ldb, size_t kc, size_t w, size_t nr, float *bp)
{
    for (size_t j = 0; j < w; j++) {
        const float *row = b + j * ldb;
        for (size_t k = 0; k < kc; k++) bp[k * nr + j] = row[k];
    }
    for (size_t k = 0; k < kc; k++)
        for (size_t j = w; j < nr; j++) bp[k * nr + j] = 0.0f;
}

/* B [K, N]: the whole kc x nc panel, sweeping along rows of B (a narrow sliver
 * would touch one cache line in each of kc rows, which for power-of-two N all
 * map to the same cache sets). */
static void pack_b_panel(const float *b, size_t ldb, size_t kc, size_t nc, size_t nr, float *bp)
{
    const size_t full = nc - nc % nr;
    for (size_t k = 0; k < kc; k++) {
        const float *row = b + k * ldb;
        for (size_t j0 = 0; j0 < full; j0 += nr) memcpy(bp + j0 * kc + k * nr, row + j0, nr * sizeof(float));
        if (full < nc) {
            float *dst = bp + full * kc + k * nr;
            memcpy(dst, row + full, (nc - full) * sizeof(float));
            memset(dst + (nc - full), 0, (nr - (nc - full)) * sizeof(float));
        }
    }
}

/* Columns of C per block in the small-M [K, N] kernels: the M x W block of C
 * (16 KiB) stays in L1 while long contiguous pieces of B rows stream past. */
static size_t nn_width(size_t M)
{
    size_t w = (4096 / M) & ~(size_t)7;
    return w < 512 ? 512 : w;
}

/* ---- portable C micro-kernel: 4 x 8 ---- */

static void ukr_scalar(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                       int accumulate, size_t mr, size_t nr)
{
    float acc[4][8] = {{0}};
    for (size_t k = 0; k < kc; k++, ap += 4, bp += 8)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 8; j++) acc[i][j] += ap[i] * bp[j];
    store_tile(&acc[0][0], 8, c, ldc, accumulate, mr, nr);
}

/* ---- AVX2 / FMA ---- */
#if NX_HAVE_AVX2
static NX_TARGET_AVX2 void ukr_avx2(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                             int accumulate, size_t mr, size_t nr)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    /* C rows are far apart (often a multiple of 4 KiB): fetch them while computing. */
    for (size_t i = 0; i < mr; i++) {
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 15), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (size_t k = 0; k < kc; k++, ap += 6, bp += 16) {
        __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8), a;
        a = _mm256_broadcast_ss(ap + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(ap + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(ap + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(ap + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(ap + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(ap + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    if (mr == 6 && nr == 16) {
        for (int i = 0; i < 6; i++) {
            float *ci = c + i * ldc;
            if (accumulate) {
                acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(ci));
                acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(ci + 8));
            }
            _mm256_storeu_ps(ci, acc[i][0]);
            _mm256_storeu_ps(ci + 8, acc[i][1]);
        }
    } else {
        float tmp[6 * 16];
        for (int i = 0; i < 6; i++) {
            _mm256_storeu_ps(tmp + 16 * i, acc[i][0]);
            _mm256_storeu_ps(tmp + 16 * i + 8, acc[i][1]);
        }
        store_tile(tmp, 16, c, ldc, accumulate, mr, nr);
    }
}

/* Small M, B [K, N]: C[m, j0:j0+w] += sum over 4 rows k of A[m, k] * B[k, j0:j0+w].
 * B is read once, in long contiguous row pieces; the C block and the 4 B pieces
 * stay in L1 while every row of A uses them. */
static NX_TARGET_AVX2 void small_nn_avx2(size_t M, size_t N, size_t K, const float *a, size_t lda,
                                        const float *b, size_t ldb, float *c, size_t ldc)
{
    static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const size_t W = nn_width(M);
    for (size_t j0 = 0; j0 < N; j0 += W) {
        const size_t w = N - j0 < W ? N - j0 : W, wv = w & ~(size_t)7;
        const __m256i tail = _mm256_loadu_si256((const __m256i *)(lanes + 8 - (w - wv)));
        for (size_t m = 0; m < M; m++) memset(c + m * ldc + j0, 0, w * sizeof(float));
        for (size_t k = 0; k < K; k += 4) {
            const size_t kb = K - k < 4 ? K - k : 4;
            const float *b0 = b + k * ldb + j0;
            /* Missing rows of a short last step reuse row 0 with a zero weight. */
            const float *b1 = kb > 1 ? b0 + ldb : b0, *b2 = kb > 2 ? b0 + 2 * ldb : b0, *b3 = kb > 3 ? b0 + 3 * ldb : b0;
            for (size_t m = 0; m < M; m++) {
                const float *am = a + m * lda + k;
                const __m256 a0 = _mm256_set1_ps(am[0]), a1 = _mm256_set1_ps(kb > 1 ? am[1] : 0.0f);
                const __m256 a2 = _mm256_set1_ps(kb > 2 ? am[2] : 0.0f), a3 = _mm256_set1_ps(kb > 3 ? am[3] : 0.0f);
                float *cm = c + m * ldc + j0;
                size_t j = 0;
                for (; j < wv; j += 8) {
                    __m256 acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b0 + j), _mm256_loadu_ps(cm + j));
                    acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b1 + j), acc);
                    acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(b2 + j), acc);
                    acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(b3 + j), acc);
                    _mm256_storeu_ps(cm + j, acc);
                }
                if (j < w) {
                    __m256 acc = _mm256_fmadd_ps(a0, _mm256_maskload_ps(b0 + j, tail), _mm256_maskload_ps(cm + j, tail));
                    acc = _mm256_fmadd_ps(a1, _mm256_maskload_ps(b1 + j, tail), acc);
                    acc = _mm256_fmadd_ps(a2, _mm256_maskload_ps(b2 + j, tail), acc);
                    acc = _mm256_fmadd_ps(a3, _mm256_maskload_ps(b3 + j, tail), acc);
                    _mm256_maskstore_ps(cm + j, tail, acc);
                }
            }
        }
    }
}

static NX_TARGET_AVX2 float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* Small M, B [N, K]: C[0:mb, 0:nb] as dot products of mb rows of A with nb rows
 * of B; the K tail uses masked loads (masked lanes read as 0). */
static inline NX_TARGET_AVX2 __attribute__((always_inline)) void
small_nt_tile_avx2(int mb, int nb, size_t K, const float *a, size_t lda, const float *b, size_t ldb,
                   float *c, size_t ldc)
{
    __m256 acc[2][4];
    for (int m = 0; m < mb; m++)
        for (int n = 0; n < nb; n++) acc[m][n] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 bv[4];
        for (int n = 0; n < nb; n++) bv[n] = _mm256_loadu_ps(b + n * ldb + k);
        for (int m = 0; m < mb; m++) {
            __m256 av = _mm256_loadu_ps(a + m * lda + k);
            for (int n = 0; n < nb; n++) acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);
        }
    }
    if (k < K) {
        static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i mask = _mm256_loadu_si256((const __m256i *)(lanes + 8 - (K - k)));
        __m256 bv[4];
        for (int n = 0; n < nb; n++) bv[n] = _mm256_maskload_ps(b + n * ldb + k, mask);
        for (int m = 0; m < mb; m++) {
            __m256 av = _mm256_maskload_ps(a + m * lda + k, mask);
            for (int n = 0; n < nb; n++) acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int n = 0; n < nb; n++) c[m * ldc + n] = hsum256(acc[m][n]);
}

static NX_TARGET_AVX2 void small_nt_avx2(size_t M, size_t N, size_t K, const float *a, size_t lda,
                                  const float *b, size_t ldb, float *c, size_t ldc)
{
    /* 4 rows of B at a time; their K extent is re-read from cache by each row pair of A. */
    for (size_t n = 0; n < N; n += 4) {
        int nb = N - n < 4 ? (int)(N - n) : 4;
        for (size_t m = 0; m < M; m += 2) {
            const float *am = a + m * lda, *bn = b + n * ldb;
            float *cm = c + m * ldc + n;
            if (M - m >= 2) {
                switch (nb) {
                case 4: small_nt_tile_avx2(2, 4, K, am, lda, bn, ldb, cm, ldc); break;
                case 3: small_nt_tile_avx2(2, 3, K, am, lda, bn, ldb, cm, ldc); break;
                case 2: small_nt_tile_avx2(2, 2, K, am, lda, bn, ldb, cm, ldc); break;
                default: small_nt_tile_avx2(2, 1, K, am, lda, bn, ldb, cm, ldc); break;
                }
            } else {
                switch (nb) {
                case 4: small_nt_tile_avx2(1, 4, K, am, lda, bn, ldb, cm, ldc); break;
                case 3: small_nt_tile_avx2(1, 3, K, am, lda, bn, ldb, cm, ldc); break;
                case 2: small_nt_tile_avx2(1, 2, K, am, lda, bn, ldb, cm, ldc); break;
                default: small_nt_tile_avx2(1, 1, K, am, lda, bn, ldb, cm, ldc); break;
                }
            }
        }
    }
}
#endif

/* ---- NEON ---- */
#if NX_HAVE_NEON
#define NX_ROW8(i, av, lane)                                      \
    c##i##0 = vfmaq_laneq_f32(c##i##0, b0, av, lane);             \
    c##i##1 = vfmaq_laneq_f32(c##i##1, b1, av, lane)

static void ukr_neon(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                     int accumulate, size_t mr, size_t nr)
{
    float32x4_t z = vdupq_n_f32(0.0f);
    float32x4_t c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
    float32x4_t c40 = z, c41 = z, c50 = z, c51 = z, c60 = z, c61 = z, c70 = z, c71 = z;
#pragma GCC unroll 2
    for (size_t k = 0; k < kc; k++, ap += 8, bp += 8) {
        float32x4_t a0 = vld1q_f32(ap), a1 = vld1q_f32(ap + 4);
        float32x4_t b0 = vld1q_f32(bp), b1 = vld1q_f32(bp + 4);
        NX_ROW8(0, a0, 0); NX_ROW8(1, a0, 1); NX_ROW8(2, a0, 2); NX_ROW8(3, a0, 3);
        NX_ROW8(4, a1, 0); NX_ROW8(5, a1, 1); NX_ROW8(6, a1, 2); NX_ROW8(7, a1, 3);
    }
    float32x4_t acc[8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                             {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}};
    if (mr == 8 && nr == 8) {
        for (int i = 0; i < 8; i++) {
            float *ci = c + i * ldc;
            if (accumulate) {
                acc[i][0] = vaddq_f32(acc[i][0], vld1q_f32(ci));
                acc[i][1] = vaddq_f32(acc[i][1], vld1q_f32(ci + 4));
            }
            vst1q_f32(ci, acc[i][0]);
            vst1q_f32(ci + 4, acc[i][1]);
        }
    } else {
        float tmp[8 * 8];
        for (int i = 0; i < 8; i++) {
            vst1q_f32(tmp + 8 * i, acc[i][0]);
            vst1q_f32(tmp + 8 * i + 4, acc[i][1]);
        }
        store_tile(tmp, 8, c, ldc, accumulate, mr, nr);
    }
}
#undef NX_ROW8

/* Small M, B [K, N]: same scheme as small_nn_avx2. */
static void small_nn_neon(size_t M, size_t N, size_t K, const float *a, size_t lda,
                          const float *b, size_t ldb, float *c, size_t ldc)
{
    const size_t W = nn_width(M);
    for (size_t j0 = 0; j0 < N; j0 += W) {
        const size_t w = N - j0 < W ? N - j0 : W;
        for (size_t m = 0; m < M; m++) memset(c + m * ldc + j0, 0, w * sizeof(float));
        for (size_t k = 0; k < K; k += 4) {
            const size_t kb = K - k < 4 ? K - k : 4;
            const float *b0 = b + k * ldb + j0;
            const float *b1 = kb > 1 ? b0 + ldb : b0, *b2 = kb > 2 ? b0 + 2 * ldb : b0, *b3 = kb > 3 ? b0 + 3 * ldb : b0;
            for (size_t m = 0; m < M; m++) {
                const float *am = a + m * lda + k;
                const float a0 = am[0], a1 = kb > 1 ? am[1] : 0.0f, a2 = kb > 2 ? am[2] : 0.0f, a3 = kb > 3 ? am[3] : 0.0f;
                float *cm = c + m * ldc + j0;
                size_t j = 0;
                for (; j + 4 <= w; j += 4) {
                    float32x4_t acc = vfmaq_n_f32(vld1q_f32(cm + j), vld1q_f32(b0 + j), a0);
                    acc = vfmaq_n_f32(acc, vld1q_f32(b1 + j), a1);
                    acc = vfmaq_n_f32(acc, vld1q_f32(b2 + j), a2);
                    acc = vfmaq_n_f32(acc, vld1q_f32(b3 + j), a3);
                    vst1q_f32(cm + j, acc);
                }
                for (; j < w; j++) cm[j] += a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j];
            }
        }
    }
}

/* Small M, B [N, K]: dot products of mb rows of A with nb rows of B. */
static inline __attribute__((always_inline)) void
small_nt_tile_neon(int mb, int nb, size_t K, const float *a, size_t lda, const float *b, size_t ldb,
                   float *c, size_t ldc)
{
    float32x4_t acc[2][4];
    for (int m = 0; m < mb; m++)
        for (int n = 0; n < nb; n++) acc[m][n] = vdupq_n_f32(0.0f);
    size_t k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t bv[4];
        for (int n = 0; n < nb; n++) bv[n] = vld1q_f32(b + n * ldb + k);
        for (int m = 0; m < mb; m++) {
            float32x4_t av = vld1q_f32(a + m * lda + k);
            for (int n = 0; n < nb; n++) acc[m][n] = vfmaq_f32(acc[m][n], av, bv[n]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int n = 0; n < nb; n++) {
            float s = vaddvq_f32(acc[m][n]);
            for (size_t kk = k; kk < K; kk++) s += a[m * lda + kk] * b[n * ldb + kk];
            c[m * ldc + n] = s;
        }
}

static void small_nt_neon(size_t M, size_t N, size_t K, const float *a, size_t lda,
                          const float *b, size_t ldb, float *c, size_t ldc)
{
    for (size_t n = 0; n < N; n += 4) {
        int nb = N - n < 4 ? (int)(N - n) : 4;
        for (size_t m = 0; m < M; m += 2) {
            const float *am = a + m * lda, *bn = b + n * ldb;
            float *cm = c + m * ldc + n;
            if (M - m >= 2) {
                switch (nb) {
                case 4: small_nt_tile_neon(2, 4, K, am, lda, bn, ldb, cm, ldc); break;
                case 3: small_nt_tile_neon(2, 3, K, am, lda, bn, ldb, cm, ldc); break;
                case 2: small_nt_tile_neon(2, 2, K, am, lda, bn, ldb, cm, ldc); break;
                default: small_nt_tile_neon(2, 1, K, am, lda, bn, ldb, cm, ldc); break;
                }
            } else {
                switch (nb) {
                case 4: small_nt_tile_neon(1, 4, K, am, lda, bn, ldb, cm, ldc); break;
                case 3: small_nt_tile_neon(1, 3, K, am, lda, bn, ldb, cm, ldc); break;
                case 2: small_nt_tile_neon(1, 2, K, am, lda, bn, ldb, cm, ldc); break;
                default: small_nt_tile_neon(1, 1, K, am, lda, bn, ldb, cm, ldc); break;
                }
            }
        }
    }
}
#endif

/* ---- blocked driver ---- */

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

static int gemm_packed(const gemm_cfg *g, size_t M, size_t N, size_t K, const float *a, size_t lda,
                       const float *b, size_t ldb, int trans_b, float *c, size_t ldc)
{
    const size_t nc_max = round_up(N < NC ? N : NC, g->nr), kc_max = K < KC ? K : KC;
    const size_t mc_max = round_up(M < g->mc ? M : g->mc, g->mr);
    /* 64-byte aligned: the micro-kernels use aligned loads on the packed buffers. */
    float *bp = aligned_alloc(64, round_up(kc_max * nc_max * sizeof(float), 64));
    float *ap = aligned_alloc(64, round_up(kc_max * mc_max * sizeof(float), 64));
    if (!bp || !ap) {
        free(bp);
        free(ap);
        return NX_ENOMEM;
    }
    for (size_t jc = 0; jc < N; jc += NC) {
        size_t nc = N - jc < NC ? N - jc : NC;
        for (size_t pc = 0; pc < K; pc += KC) {
            size_t kc = K - pc < KC ? K - pc : KC;
            if (!trans_b) pack_b_panel(b + pc * ldb + jc, ldb, kc, nc, g->nr, bp);
            for (size_t ic = 0; ic < M; ic += g->mc) {
                size_t mc = M - ic < g->mc ? M - ic : g->mc;
                pack_a(a + ic * lda + pc, lda, mc, kc, g->mr, ap);
                for (size_t jr = 0; jr < nc; jr += g->nr) {
                    size_t nr = nc - jr < g->nr ? nc - jr : g->nr;
                    /* Transposed B: the first row block packs each sliver just before
                     * using it, while it is still in L1. */
                    if (trans_b && ic == 0) pack_b_rows(b + (jc + jr) * ldb + pc, ldb, kc, nr, g->nr, bp + jr * kc);
                    for (size_t ir = 0; ir < mc; ir += g->mr) {
                        size_t mr = mc - ir < g->mr ? mc - ir : g->mr;
                        g->ukr(kc, ap + ir * kc, bp + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc, pc > 0, mr, nr);
                    }
                }
            }
        }
    }
    free(bp);
    free(ap);
    return NX_OK;
}

int nx_matmul(nx_path p, size_t M, size_t N, size_t K, const float *a, size_t lda,
              const float *b, size_t ldb, int trans_b, float *c, size_t ldc)
{
    if (M == 0 || N == 0) return NX_OK;
    if (K == 0) {
        for (size_t i = 0; i < M; i++) memset(c + i * ldc, 0, N * sizeof(float));
        return NX_OK;
    }
    gemm_cfg g = {4, 8, 128, ukr_scalar};
#if NX_HAVE_AVX2
    if (p == NX_AVX2) {
        if (M <= SMALL_M) {
            if (trans_b) small_nt_avx2(M, N, K, a, lda, b, ldb, c, ldc);
            else small_nn_avx2(M, N, K, a, lda, b, ldb, c, ldc);
            return NX_OK;
        }
        g = (gemm_cfg){6, 16, 144, ukr_avx2};
    }
#endif
#if NX_HAVE_NEON
    if (p == NX_NEON) {
        if (M <= SMALL_M) {
            if (trans_b) small_nt_neon(M, N, K, a, lda, b, ldb, c, ldc);
            else small_nn_neon(M, N, K, a, lda, b, ldb, c, ldc);
            return NX_OK;
        }
        g = (gemm_cfg){8, 8, 128, ukr_neon};
    }
#endif
    (void)p;
    return gemm_packed(&g, M, N, K, a, lda, b, ldb, trans_b, c, ldc);
}
