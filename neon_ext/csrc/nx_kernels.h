/* Public C interface of the neon_ext kernels.  Every entry point takes the SIMD
 * path to use first; the Python binding passes the active path, the NEON test
 * program passes NX_NEON and NX_SCALAR.  Row-wise kernels take row strides in
 * elements so callers can pass views whose last dimension is contiguous.
 * None of these functions touch Python; they are plain C. */
#ifndef NX_KERNELS_H
#define NX_KERNELS_H

#include "nx_common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { NX_OK = 0, NX_ENOMEM = 1, NX_ERANGE = 2 };
enum { NX_FP8_E4M3 = 0, NX_FP8_E5M2 = 1 };

/* cpu.c: what was compiled in and what this CPU can run. */
int nx_path_compiled(nx_path p);
int nx_path_supported(nx_path p);
nx_path nx_best_path(void);
const char *nx_path_name(nx_path p);
int nx_cpu_has_avx2_fma(void);

/* softmax.c: y = exp(x); row softmax of scale*x.  With causal set, row i of
 * every [q_rows, cols] matrix sees columns j <= i + cols - q_rows; the others
 * are 0 (a row that sees nothing is all 0).  y may alias x. */
void nx_exp(nx_path p, const float *x, float *y, size_t n);
void nx_softmax(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                size_t rows, size_t cols, float scale, int causal, size_t q_rows);

/* rmsnorm.c: y = x / sqrt(mean(x^2) + eps) * w.  The fused variant first does
 * res = x + res (in place) and normalises that.  y may alias x. */
void nx_rmsnorm(nx_path p, const float *x, ptrdiff_t x_rs, const float *w,
                float *y, ptrdiff_t y_rs, size_t rows, size_t d, float eps);
void nx_fused_add_rmsnorm(nx_path p, const float *x, ptrdiff_t x_rs, float *res, ptrdiff_t r_rs,
                          const float *w, float *y, ptrdiff_t y_rs, size_t rows, size_t d, float eps);

/* activations.c: over rows of [gate | up] (2*d wide): y = act(gate) * up.
 * gelu_tanh is element-wise; y may alias x. */
void nx_silu_and_mul(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                     size_t rows, size_t d);
void nx_gelu_tanh_and_mul(nx_path p, const float *x, ptrdiff_t x_rs, float *y, ptrdiff_t y_rs,
                          size_t rows, size_t d);
void nx_gelu_tanh(nx_path p, const float *x, float *y, size_t n);

/* rope.c: rotate, in place, the first rot_dim features of every head of q and
 * (if not NULL) k.  Rows are tokens holding heads*head_size contiguous values.
 * cos/sin come from cache ([cache_rows, rot_dim]: cos half then sin half, as in
 * vLLM) or, when cache is NULL, from theta.  Returns NX_ERANGE, before writing
 * anything, if a position is outside the cache. */
int nx_rope(nx_path p, const int64_t *pos, size_t ntok,
            float *q, ptrdiff_t q_rs, size_t q_heads, float *k, ptrdiff_t k_rs, size_t k_heads,
            size_t head_size, size_t rot_dim, int is_neox,
            const float *cache, size_t cache_rows, float theta);

/* matmul.c: C[M,N] = A[M,K] @ B, B is [K,N] or, with trans_b, [N,K]; row-major
 * with leading dimensions in elements.  C must not overlap A or B. */
int nx_matmul(nx_path p, size_t M, size_t N, size_t K, const float *a, size_t lda,
              const float *b, size_t ldb, int trans_b, float *c, size_t ldc);

/* fp8.c: per-tensor scaled FP8 (OCP E4M3 "fn" and E5M2).  Quantise computes
 * x / scale rounded to nearest even, saturating to the largest finite value
 * (also for +-inf); NaN stays NaN.  Dequantise computes fp8 * scale. */
void nx_fp8_quantize(nx_path p, const float *x, uint8_t *q, size_t n, float scale, int fmt);
void nx_fp8_dequantize(nx_path p, const uint8_t *q, float *x, size_t n, float scale, int fmt);

#ifdef __cplusplus
}
#endif

#endif
