/* Checks the neon_ext kernels on aarch64 (NEON and portable C paths) against
 * independent double-precision references, with the tolerances of
 * tests/test_kernels.py.  Cross-compiled with aarch64-linux-gnu-gcc and run
 * under qemu-aarch64 by tests/test_kernels_neon.py; also runs natively on any
 * aarch64 box.  Prints one line per check and "N passed, N failed" at the end;
 * exits non-zero if anything failed. */

/* The reference loops need no vectorising, and Debian's aarch64 gcc 12 hits an
 * internal error vectorising some of these reductions. */
#pragma GCC optimize("no-tree-vectorize")

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nx_kernels.h"

static int passed, failed;
static const char *cur_path;

static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s [%s] ", ok ? "ok  " : "FAIL", cur_path);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) passed++;
    else failed++;
}

/* ---- deterministic random numbers ---- */

static uint64_t rng_state = 88172645463325252ull;

static double uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static float randn(float scale)
{
    double u1 = uniform() + 1e-12, u2 = uniform();
    return (float)(scale * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static float *fvec(size_t n, float scale)
{
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = randn(scale);
    return v;
}

/* Worst relative error of got against ref, where |got - ref| <= rtol*|ref| + atol must hold. */
static double worst(const float *got, const double *ref, size_t n, double rtol, double atol, int *ok)
{
    double w = 0.0;
    *ok = 1;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - ref[i]);
        if (!(err <= rtol * fabs(ref[i]) + atol)) *ok = 0;
        if (fabs(ref[i]) > 0 && err / fabs(ref[i]) > w) w = err / fabs(ref[i]);
    }
    return w;
}

static const size_t SIZES[] = {1, 3, 7, 8, 9, 63, 64, 65, 4095};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])

/* ---- exp ---- */

static void test_exp(nx_path p)
{
    const size_t n = 20011;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    double *ref = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)(-87.0 + (88.3 + 87.0) * (double)i / (double)(n - 1));
        ref[i] = exp((double)x[i]);
    }
    nx_exp(p, x, y, n);
    int ok;
    double w = worst(y, ref, n, 1e-6, 0.0, &ok);
    int max_ulp = 0;
    for (size_t i = 0; i < n; i++) {
        float r = (float)ref[i];
        int32_t a, b;
        memcpy(&a, &y[i], 4);
        memcpy(&b, &r, 4);
        if (abs(a - b) > max_ulp) max_ulp = abs(a - b);
    }
    check(ok && max_ulp <= 2, "exp over [-87, 88.3]: worst rel %.3g, max %d ULP", w, max_ulp);

    float sx[16] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 88.8f, 100.0f, -87.4f, -200.0f, 1e-30f, 1.0f, -1.0f,
                    0.5f, 2.0f, -3.0f, 10.0f};
    float sy[16];
    nx_exp(p, sx, sy, 16);
    check(sy[0] == 1.0f && sy[1] == 1.0f && sy[2] == INFINITY && sy[3] == 0.0f && isnan(sy[4]) &&
              sy[5] == INFINITY && sy[6] == INFINITY && sy[7] == 0.0f && sy[8] == 0.0f && sy[9] == 1.0f,
          "exp special values");
    free(x);
    free(y);
    free(ref);
}

/* ---- softmax ---- */

static void softmax_ref(const float *x, double *ref, size_t cols, size_t len, double scale)
{
    double m = -INFINITY, s = 0.0;
    for (size_t j = 0; j < len; j++) m = fmax(m, x[j] * scale);
    for (size_t j = 0; j < cols; j++) ref[j] = j < len ? exp(x[j] * scale - m) : 0.0;
    for (size_t j = 0; j < len; j++) s += ref[j];
    for (size_t j = 0; j < cols; j++) ref[j] = len ? ref[j] / s : 0.0;
}

static void test_softmax(nx_path p)
{
    const float scales[] = {1.0f, 0.125f, -2.0f};
    for (size_t si = 0; si < NSIZES; si++)
        for (int sc = 0; sc < 3; sc++) {
            size_t rows = 4, cols = SIZES[si];
            float *x = fvec(rows * cols, 4.0f), *y = malloc(rows * cols * sizeof(float));
            double *ref = malloc(rows * cols * sizeof(double));
            for (size_t r = 0; r < rows; r++) softmax_ref(x + r * cols, ref + r * cols, cols, cols, scales[sc]);
            nx_softmax(p, x, (ptrdiff_t)cols, y, (ptrdiff_t)cols, rows, cols, scales[sc], 0, rows);
            int ok;
            double w = worst(y, ref, rows * cols, 1e-6, 0.0, &ok);
            check(ok, "softmax cols=%zu scale=%g: worst rel %.3g", cols, scales[sc], w);
            free(x);
            free(y);
            free(ref);
        }
    /* causal, including a matrix with more queries than keys */
    const size_t qk[][2] = {{7, 7}, {9, 65}, {3, 4095}, {5, 3}};
    for (int t = 0; t < 4; t++) {
        size_t q = qk[t][0], k = qk[t][1];
        float *x = fvec(2 * q * k, 1.0f), *y = malloc(2 * q * k * sizeof(float));
        double *ref = malloc(2 * q * k * sizeof(double));
        for (size_t r = 0; r < 2 * q; r++) {
            ptrdiff_t lim = (ptrdiff_t)(r % q) + (ptrdiff_t)k - (ptrdiff_t)q + 1;
            size_t len = lim <= 0 ? 0 : (size_t)lim > k ? k : (size_t)lim;
            softmax_ref(x + r * k, ref + r * k, k, len, 0.5);
        }
        nx_softmax(p, x, (ptrdiff_t)k, y, (ptrdiff_t)k, 2 * q, k, 0.5f, 1, q);
        int ok;
        double w = worst(y, ref, 2 * q * k, 1e-6, 0.0, &ok);
        check(ok, "causal softmax q=%zu k=%zu: worst rel %.3g", q, k, w);
        free(x);
        free(y);
        free(ref);
    }
}

/* ---- RMSNorm ---- */

static void test_rmsnorm(nx_path p)
{
    const size_t extra[] = {576, 2048};
    for (size_t si = 0; si < NSIZES + 2; si++) {
        size_t d = si < NSIZES ? SIZES[si] : extra[si - NSIZES], rows = 3;
        float *x = fvec(rows * d, 3.0f), *r = fvec(rows * d, 1.0f), *w = fvec(d, 1.0f);
        float *y = malloc(rows * d * sizeof(float)), *r0 = malloc(rows * d * sizeof(float));
        double *ref = malloc(rows * d * sizeof(double));
        memcpy(r0, r, rows * d * sizeof(float));
        for (int fused = 0; fused < 2; fused++) {
            int exact = 1;
            for (size_t i = 0; i < rows; i++) {
                double ss = 0.0;
                for (size_t j = 0; j < d; j++) {
                    double v = fused ? (double)(float)(x[i * d + j] + r0[i * d + j]) : x[i * d + j];
                    ss += v * v;
                }
                double inv = 1.0 / sqrt(ss / (double)d + 1e-5);
                for (size_t j = 0; j < d; j++) {
                    double v = fused ? (double)(float)(x[i * d + j] + r0[i * d + j]) : x[i * d + j];
                    ref[i * d + j] = v * inv * w[j];
                }
            }
            if (fused) {
                nx_fused_add_rmsnorm(p, x, (ptrdiff_t)d, r, (ptrdiff_t)d, w, y, (ptrdiff_t)d, rows, d, 1e-5f);
                for (size_t i = 0; i < rows * d; i++) exact &= r[i] == x[i] + r0[i];
            } else {
                nx_rmsnorm(p, x, (ptrdiff_t)d, w, y, (ptrdiff_t)d, rows, d, 1e-5f);
            }
            int ok;
            double wr = worst(y, ref, rows * d, 1e-5, 0.0, &ok);
            check(ok && exact, "%s d=%zu: worst rel %.3g", fused ? "fused_add_rmsnorm" : "rmsnorm", d, wr);
        }
        free(x);
        free(r);
        free(w);
        free(y);
        free(r0);
        free(ref);
    }
}

/* ---- activations ---- */

static double silu_ref(double x) { return x / (1.0 + exp(-x)); }

static double gelu_ref(double x)
{
    double u = sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
    return x / (1.0 + exp(-2.0 * u));
}

static void test_activations(nx_path p)
{
    const float extremes[] = {0.0f, -0.0f, 1e-20f, -1e-20f, 30.0f, -30.0f, 88.0f, -88.0f, 100.0f, -100.0f};
    for (size_t si = 0; si < NSIZES; si++) {
        size_t d = SIZES[si], rows = 3;
        float *x = fvec(rows * 2 * d, 4.0f), *y = malloc(rows * d * sizeof(float));
        double *ref = malloc(rows * 2 * d * sizeof(double));
        for (size_t i = 0; i < d && i < 10; i++) x[i] = extremes[i];
        for (int act = 0; act < 2; act++) {
            for (size_t r = 0; r < rows; r++)
                for (size_t j = 0; j < d; j++) {
                    double g = x[r * 2 * d + j], u = x[r * 2 * d + d + j];
                    ref[r * d + j] = (act ? gelu_ref(g) : silu_ref(g)) * u;
                }
            if (act) nx_gelu_tanh_and_mul(p, x, (ptrdiff_t)(2 * d), y, (ptrdiff_t)d, rows, d);
            else nx_silu_and_mul(p, x, (ptrdiff_t)(2 * d), y, (ptrdiff_t)d, rows, d);
            int ok;
            double w = worst(y, ref, rows * d, 1e-5, 1e-30, &ok);
            check(ok, "%s d=%zu: worst rel %.3g", act ? "gelu_tanh_and_mul" : "silu_and_mul", d, w);
        }
        float *g = malloc(2 * d * sizeof(float));
        for (size_t i = 0; i < 2 * d; i++) ref[i] = gelu_ref(x[i]);
        nx_gelu_tanh(p, x, g, 2 * d);
        int ok;
        double w = worst(g, ref, 2 * d, 1e-5, 1e-30, &ok);
        check(ok, "gelu_tanh n=%zu: worst rel %.3g", 2 * d, w);
        free(g);
        free(x);
        free(y);
        free(ref);
    }
}

/* ---- RoPE ---- */

static void rope_ref(const int64_t *pos, size_t ntok, float *x, ptrdiff_t rs, size_t heads, size_t hs, size_t rot,
                     const float *cache, int neox)
{
    size_t half = rot / 2;
    for (size_t t = 0; t < ntok; t++)
        for (size_t h = 0; h < heads; h++) {
            float *v = x + (ptrdiff_t)t * rs + h * hs;
            const float *c = cache + pos[t] * rot, *s = c + half;
            for (size_t i = 0; i < half; i++) {
                size_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                float x1 = v[a], x2 = v[b];
                float p1 = x1 * c[i], p2 = x2 * s[i], p3 = x2 * c[i], p4 = x1 * s[i];
                v[a] = p1 - p2;
                v[b] = p3 + p4;
            }
        }
}

static void test_rope(nx_path p)
{
    const size_t hs_rot[][2] = {{64, 64}, {128, 128}, {80, 32}, {6, 6}, {18, 10}};
    const size_t max_pos = 4096, nq = 9, nk = 3;
    for (int t = 0; t < 5; t++)
        for (int neox = 0; neox < 2; neox++) {
            size_t hs = hs_rot[t][0], rot = hs_rot[t][1], ntok = 33, width = (nq + 2 * nk) * hs;
            float *cache = malloc(max_pos * rot * sizeof(float));
            for (size_t ps = 0; ps < max_pos; ps++)
                for (size_t i = 0; i < rot / 2; i++) {
                    float inv = 1.0f / powf(10000.0f, (float)(2 * i) / (float)rot);
                    float a = (float)ps * inv;
                    cache[ps * rot + i] = (float)cos((double)a);
                    cache[ps * rot + rot / 2 + i] = (float)sin((double)a);
                }
            int64_t pos[33];
            for (size_t i = 0; i < ntok; i++) pos[i] = (int64_t)(uniform() * max_pos);
            float *qkv = fvec(ntok * width, 1.0f), *ref = malloc(ntok * width * sizeof(float));
            memcpy(ref, qkv, ntok * width * sizeof(float));
            rope_ref(pos, ntok, ref, (ptrdiff_t)width, nq, hs, rot, cache, neox);
            rope_ref(pos, ntok, ref + nq * hs, (ptrdiff_t)width, nk, hs, rot, cache, neox);
            int rc = nx_rope(p, pos, ntok, qkv, (ptrdiff_t)width, nq, qkv + nq * hs, (ptrdiff_t)width, nk, hs, rot, neox,
                             cache, max_pos, 0.0f);
            check(rc == NX_OK && memcmp(qkv, ref, ntok * width * sizeof(float)) == 0,
                  "rope %s head_size=%zu rotary_dim=%zu from cache: bit-exact", neox ? "neox" : "gptj", hs, rot);

            /* from theta: cos/sin of the same float angles, computed by the kernel */
            memcpy(qkv, ref, ntok * width * sizeof(float)); /* any input will do */
            float *exp_out = malloc(ntok * width * sizeof(float));
            memcpy(exp_out, qkv, ntok * width * sizeof(float));
            rope_ref(pos, ntok, exp_out, (ptrdiff_t)width, nq, hs, rot, cache, neox);
            rc = nx_rope(p, pos, ntok, qkv, (ptrdiff_t)width, nq, NULL, 0, 0, hs, rot, neox, NULL, 0, 10000.0f);
            double maxerr = 0.0;
            for (size_t i = 0; i < ntok * width; i++) {
                double e = fabs((double)qkv[i] - exp_out[i]);
                if (e > maxerr) maxerr = e;
            }
            check(rc == NX_OK && maxerr <= 2e-5, "rope %s head_size=%zu from theta: max abs err %.3g",
                  neox ? "neox" : "gptj", hs, maxerr);
            int64_t bad[2] = {0, (int64_t)max_pos};
            check(nx_rope(p, bad, 2, qkv, (ptrdiff_t)width, nq, NULL, 0, 0, hs, rot, neox, cache, max_pos, 0.0f) ==
                      NX_ERANGE,
                  "rope rejects a position outside the cache");
            free(exp_out);
            free(cache);
            free(qkv);
            free(ref);
        }
}

/* ---- matmul ---- */

static void test_matmul(nx_path p)
{
    const size_t ms[] = {1, 3, 8, 9, 65}, ns[] = {1, 7, 64, 65}, ks[] = {1, 9, 63, 64};
    size_t shapes[100][3], ns_ = 0;
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 4; c++) {
                shapes[ns_][0] = ms[a];
                shapes[ns_][1] = ns[b];
                shapes[ns_][2] = ks[c];
                ns_++;
            }
    const size_t big[][3] = {{300, 257, 520}, {7, 2100, 33}, {130, 17, 1000}, {8, 24, 4}, {16, 2049, 3}};
    for (int i = 0; i < 5; i++) memcpy(shapes[ns_++], big[i], sizeof big[i]);
    int all_ok = 1;
    double worst_ratio = 0.0;
    for (size_t s = 0; s < ns_; s++)
        for (int tb = 0; tb < 2; tb++) {
            size_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            float *A = fvec(M * K, 1.0f), *B = fvec(K * N, 1.0f), *C = malloc(M * N * sizeof(float));
            nx_matmul(p, M, N, K, A, K, B, tb ? K : N, tb, C, N);
            int ok = 1;
            for (size_t i = 0; i < M; i++)
                for (size_t j = 0; j < N; j++) {
                    double ref = 0.0, mag = 0.0;
                    for (size_t k = 0; k < K; k++) {
                        double b = tb ? B[j * K + k] : B[k * N + j];
                        ref += (double)A[i * K + k] * b;
                        mag += fabs((double)A[i * K + k] * b);
                    }
                    double bound = (double)K * 5.9604644775390625e-08 * mag * 1.01 + 1e-30;
                    double err = fabs(C[i * N + j] - ref);
                    if (!(err <= bound)) ok = 0;
                    if (err / bound > worst_ratio) worst_ratio = err / bound;
                }
            if (!ok) check(0, "matmul M=%zu N=%zu K=%zu trans_b=%d", M, N, K, tb);
            all_ok &= ok;
            free(A);
            free(B);
            free(C);
        }
    check(all_ok, "matmul %zu shapes x 2 layouts within K*u*|A||B| (worst err/bound %.3g)", ns_, worst_ratio);
}

/* ---- FP8 ---- */

static const int MBITS[2] = {3, 2}, BIAS[2] = {7, 15};
static const double FMAX[2] = {448.0, 57344.0};

/* Independent decoder straight from the format definitions. */
static double fp8_value(int code, int fmt)
{
    int m_bits = MBITS[fmt], bias = BIAS[fmt], emax = (1 << (7 - m_bits)) - 1;
    int s = code >> 7, e = (code >> m_bits) & emax, m = code & ((1 << m_bits) - 1);
    double sign = s ? -1.0 : 1.0;
    if (fmt == NX_FP8_E4M3 && e == emax && m == 7) return NAN;
    if (fmt == NX_FP8_E5M2 && e == emax) return m ? NAN : sign * INFINITY;
    if (e == 0) return sign * ldexp(m, 1 - bias - m_bits);
    return sign * ldexp(1.0 + m / (double)(1 << m_bits), e - bias);
}

/* Independent quantiser: nearest finite code by search, ties to the even code. */
static int fp8_nearest(double v, int fmt)
{
    if (isnan(v)) return (signbit(v) ? 0x80 : 0) | 0x7F;
    if (v > FMAX[fmt]) v = FMAX[fmt];
    if (v < -FMAX[fmt]) v = -FMAX[fmt];
    int best = -1;
    double best_err = INFINITY;
    for (int c = 0; c < 256; c++) {
        double f = fp8_value(c, fmt);
        if (!isfinite(f) || (signbit(f) != signbit(v))) continue;
        double err = fabs(f - v);
        if (err < best_err || (err == best_err && (c & 1) == 0)) {
            best = c;
            best_err = err;
        }
    }
    return best;
}

static void test_fp8(nx_path p)
{
    const char *names[2] = {"e4m3", "e5m2"};
    for (int fmt = 0; fmt < 2; fmt++) {
        uint8_t codes[259];
        float vals[259];
        for (int i = 0; i < 259; i++) codes[i] = (uint8_t)(i & 0xFF);
        int ok = 1;
        const float scales[3] = {1.0f, 0.37f, 1024.0f};
        for (int si = 0; si < 3; si++) {
            nx_fp8_dequantize(p, codes, vals, 259, scales[si], fmt);
            for (int i = 0; i < 259; i++) {
                double ref = fp8_value(codes[i], fmt);
                float want = (float)((float)ref * scales[si]);
                if (isnan(ref) ? !isnan(vals[i]) : memcmp(&vals[i], &want, 4) != 0) ok = 0;
            }
        }
        check(ok, "fp8 %s dequantise all 256 codes, 3 scales", names[fmt]);

        nx_fp8_dequantize(p, codes, vals, 256, 1.0f, fmt);
        uint8_t back[256];
        nx_fp8_quantize(p, vals, back, 256, 1.0f, fmt);
        ok = 1;
        for (int c = 0; c < 256; c++) {
            int want = isnan(vals[c]) ? ((c & 0x80) | 0x7F) : isinf(vals[c]) ? ((c & 0x80) | 0x7B) : c;
            if (back[c] != want) ok = 0;
        }
        check(ok, "fp8 %s round trip of all 256 codes", names[fmt]);

        /* random values over every binade, ties, specials; scale 7.5 */
        const size_t n = 20000;
        float *x = malloc((n + 300) * sizeof(float));
        uint8_t *q = malloc(n + 300);
        size_t cnt = 0;
        for (size_t i = 0; i < n; i++)
            x[cnt++] = (float)((uniform() + 1.0) * ldexp(1.0, (int)(uniform() * 50) - 30) * (uniform() < 0.5 ? -1 : 1));
        for (int c = 0; c < 127; c++) { /* midpoints between neighbouring finite codes */
            double a = fp8_value(c, fmt), b = fp8_value(c + 1, fmt);
            if (isfinite(a) && isfinite(b)) {
                x[cnt++] = (float)((a + b) / 2 * 7.5);
                x[cnt++] = (float)(-(a + b) / 2 * 7.5);
            }
        }
        const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e38f, -1e38f, 1e-45f};
        for (int i = 0; i < 8; i++) x[cnt++] = specials[i];
        nx_fp8_quantize(p, x, q, cnt, 7.5f, fmt);
        ok = 1;
        for (size_t i = 0; i < cnt; i++) {
            int want = fp8_nearest((double)(x[i] / 7.5f), fmt);
            if (q[i] != want) {
                if (ok) printf("     first mismatch: x=%.9g code %#x want %#x\n", x[i], q[i], want);
                ok = 0;
            }
        }
        check(ok, "fp8 %s quantise %zu values (all binades, ties, specials) vs nearest-even search", names[fmt], cnt);
        free(x);
        free(q);
    }
}

int main(void)
{
    const nx_path paths[2] = {NX_NEON, NX_SCALAR};
    for (int i = 0; i < 2; i++) {
        nx_path p = paths[i];
        cur_path = nx_path_name(p);
        if (!nx_path_supported(p)) {
            check(0, "path not supported on this machine");
            continue;
        }
        test_exp(p);
        test_softmax(p);
        test_rmsnorm(p);
        test_activations(p);
        test_rope(p);
        test_matmul(p);
        test_fp8(p);
    }
    cur_path = "-";
    check(nx_best_path() == NX_NEON, "NEON is the default path on aarch64");
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
