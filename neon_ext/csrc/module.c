/* CPython binding of the kernels: neon_ext._kernels.
 *
 * Arrays come in through the buffer protocol (NumPy arrays, or torch tensors via
 * their zero-copy .numpy() view, see neon_ext/__init__.py) and results are
 * written into caller-provided outputs, so nothing is copied.  Every argument is
 * checked here, whoever calls: wrong dtype gives TypeError, wrong shape, layout,
 * alignment or overlap gives ValueError.  Row-wise kernels accept any view whose
 * last dimension is contiguous and whose leading dimensions collapse into one
 * row stride (for example q and k sliced out of a fused qkv tensor).
 *
 * Functions take positional arguments only (METH_FASTCALL, no keyword parsing)
 * because the Python wrappers call them on every layer of every decode step. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include "nx_capi.h"
#include "nx_kernels.h"
#include "nx_rows.h"

static nx_path g_path;

#define RUN(work, stmt)                                          \
    do {                                                         \
        if ((work) >= NX_NOGIL_MIN_WORK) {                       \
            Py_BEGIN_ALLOW_THREADS stmt; Py_END_ALLOW_THREADS    \
        } else {                                                 \
            stmt;                                                \
        }                                                        \
    } while (0)

/* ---------- buffers ---------- */

typedef enum { DT_F32, DT_U8, DT_I64 } dtype;

static const char *dtype_name(dtype dt)
{
    return dt == DT_F32 ? "float32" : dt == DT_U8 ? "uint8" : "int64";
}

/* Buffers acquired by one call, released together on every exit path. */
typedef struct {
    Py_buffer v[6];
    int n;
} held;

static void release_all(held *h)
{
    while (h->n > 0) PyBuffer_Release(&h->v[--h->n]);
}

static int format_is(const Py_buffer *v, dtype dt)
{
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++; /* native little endian only */
    switch (dt) {
    case DT_F32: return v->itemsize == 4 && strcmp(f, "f") == 0;
    case DT_U8: return v->itemsize == 1 && strcmp(f, "B") == 0;
    case DT_I64: return v->itemsize == 8 && (strcmp(f, "l") == 0 || strcmp(f, "q") == 0);
    }
    return 0;
}

/* Acquire obj as a strided buffer of dtype dt; NULL with an exception set on error. */
static Py_buffer *get_buf(held *h, PyObject *obj, const char *name, dtype dt, int writable)
{
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s numpy.ndarray or CPU torch.Tensor, got %.100s",
                     name, dtype_name(dt), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Py_buffer *v = &h->v[h->n];
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, v, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be %s", name,
                     writable ? "a writable array" : "an array with strides");
        return NULL;
    }
    h->n++;
    if (!format_is(v, dt)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got buffer format '%s' (itemsize %zd)",
                     name, dtype_name(dt), v->format ? v->format : "B", v->itemsize);
        return NULL;
    }
    if ((uintptr_t)v->buf % (uintptr_t)v->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s is not aligned to its %zd-byte elements", name, v->itemsize);
        return NULL;
    }
    return v;
}

static size_t numel(const Py_buffer *v)
{
    size_t n = 1;
    for (int i = 0; i < v->ndim; i++) n *= (size_t)v->shape[i];
    return n;
}

static int same_shape(const Py_buffer *a, const Py_buffer *b)
{
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

static PyObject *shape_str(const Py_buffer *v)
{
    PyObject *t = PyTuple_New(v->ndim);
    if (!t) return NULL;
    for (int i = 0; i < v->ndim; i++) PyTuple_SET_ITEM(t, i, PyLong_FromSsize_t(v->shape[i]));
    PyObject *s = PyObject_Repr(t);
    Py_DECREF(t);
    return s;
}

static int shape_error(const char *name, const Py_buffer *v, const char *expected)
{
    PyObject *s = shape_str(v);
    if (s) {
        PyErr_Format(PyExc_ValueError, "%s has shape %U, expected %s", name, s, expected);
        Py_DECREF(s);
    }
    return -1;
}

/* A buffer seen as rows: the last ncd dims form one contiguous row of `cols`
 * elements, the leading dims collapse into `rows` rows `rs` elements apart. */
static int as_rows(const Py_buffer *v, const char *name, int ncd, rview *r)
{
    const Py_ssize_t it = v->itemsize;
    if (v->ndim < ncd || ncd < 1) {
        PyErr_Format(PyExc_ValueError, "%s must have at least %d dimension(s), got %d", name, ncd < 1 ? 1 : ncd, v->ndim);
        return -1;
    }
    r->base = v->buf;
    r->cols = 1;
    r->rows = 1;
    Py_ssize_t expect = it;
    for (int i = v->ndim - 1; i >= v->ndim - ncd; i--) {
        if (v->shape[i] != 1 && v->strides[i] != expect) {
            PyErr_Format(PyExc_ValueError, "%s must be contiguous in its last %d dimension(s)", name, ncd);
            return -1;
        }
        expect *= v->shape[i];
        r->cols *= (size_t)v->shape[i];
    }
    Py_ssize_t rs_bytes = -1;
    for (int i = v->ndim - ncd - 1; i >= 0; i--) {
        if (v->shape[i] == 1) continue;
        if (rs_bytes < 0) {
            rs_bytes = v->strides[i];
            if (rs_bytes < 0 || rs_bytes % it) {
                PyErr_Format(PyExc_ValueError, "%s must have non-negative strides that are multiples of its itemsize", name);
                return -1;
            }
            expect = rs_bytes;
        } else if (v->strides[i] != expect) {
            PyErr_Format(PyExc_ValueError, "%s: leading dimensions cannot be collapsed into rows (make it contiguous)", name);
            return -1;
        }
        expect *= v->shape[i];
        r->rows *= (size_t)v->shape[i];
    }
    if (v->ndim == ncd) r->rows = 1;
    for (int i = 0; i < v->ndim; i++)
        if (v->shape[i] == 0) r->rows = 0;
    r->rs = rs_bytes < 0 ? (ptrdiff_t)r->cols : (ptrdiff_t)(rs_bytes / it);
    return 0;
}

/* Writable rows must not share memory with each other. */
static int check_out_rows(const rview *r, const char *name)
{
    if (r->rows > 1 && r->rs < (ptrdiff_t)r->cols) {
        PyErr_Format(PyExc_ValueError, "%s has overlapping rows (row stride smaller than the row)", name);
        return -1;
    }
    return 0;
}

static int contiguous(const Py_buffer *v, const char *name)
{
    if (!PyBuffer_IsContiguous(v, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        return -1;
    }
    return 0;
}

/* out may be exactly in (in-place) when allow_same, otherwise disjoint. */
static int check_alias(const rview *out, const char *oname, const rview *in, const char *iname,
                       size_t it, int allow_same)
{
    if (allow_same && out->base == in->base && out->rs == in->rs && out->cols == in->cols && out->rows == in->rows)
        return 0;
    if (nx_rows_overlap(out, in, it)) {
        PyErr_Format(PyExc_ValueError, "%s overlaps %s%s", oname, iname,
                     allow_same ? " (only exact in-place use is allowed)" : "");
        return -1;
    }
    return 0;
}

static rview flat_view(const Py_buffer *v)
{
    rview r = {v->buf, 1, numel(v), (ptrdiff_t)numel(v)};
    return r;
}

/* ---------- argument helpers ---------- */

static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *fn)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", fn, want, nargs);
        return 0;
    }
    return 1;
}

static int get_float(PyObject *o, const char *name, float *out)
{
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(d)) {
        PyErr_Format(PyExc_ValueError, "%s must be finite", name);
        return -1;
    }
    *out = (float)d;
    return 0;
}

static PyObject *kernel_error(int rc)
{
    if (rc == NX_ENOMEM) return PyErr_NoMemory();
    PyErr_Format(PyExc_RuntimeError, "kernel failed with status %d", rc);
    return NULL;
}

/* ---------- element-wise ---------- */

typedef void (*unary_fn)(nx_path, const float *, float *, size_t);

static PyObject *unary(PyObject *const *args, Py_ssize_t nargs, const char *fn, unary_fn kernel)
{
    if (!nargs_ok(nargs, 2, fn)) return NULL;
    held h = {.n = 0};
    Py_buffer *x = get_buf(&h, args[0], "x", DT_F32, 0), *y = NULL;
    if (!x || contiguous(x, "x") || !(y = get_buf(&h, args[1], "out", DT_F32, 1)) || contiguous(y, "out")) goto fail;
    if (!same_shape(x, y)) {
        shape_error("out", y, "the shape of x");
        goto fail;
    }
    rview rx = flat_view(x), ry = flat_view(y);
    if (check_alias(&ry, "out", &rx, "x", 4, 1)) goto fail;
    size_t n = numel(x);
    nx_path p = g_path;
    RUN(n, kernel(p, x->buf, y->buf, n));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

static PyObject *py_exp(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return unary(args, nargs, "exp", nx_exp);
}

static PyObject *py_gelu_tanh(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return unary(args, nargs, "gelu_tanh", nx_gelu_tanh);
}

/* softmax(x, out, scale, causal) */
static PyObject *py_softmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 4, "softmax")) return NULL;
    held h = {.n = 0};
    float scale;
    int causal;
    rview rx, ry;
    Py_buffer *x = get_buf(&h, args[0], "x", DT_F32, 0), *y = NULL;
    if (!x || as_rows(x, "x", 1, &rx) || !(y = get_buf(&h, args[1], "out", DT_F32, 1)) ||
        as_rows(y, "out", 1, &ry) || check_out_rows(&ry, "out"))
        goto fail;
    if (!same_shape(x, y)) {
        shape_error("out", y, "the shape of x");
        goto fail;
    }
    if (check_alias(&ry, "out", &rx, "x", 4, 1) || get_float(args[2], "scale", &scale) ||
        (causal = PyObject_IsTrue(args[3])) < 0)
        goto fail;
    size_t q_rows = x->ndim >= 2 ? (size_t)x->shape[x->ndim - 2] : 1;
    nx_path p = g_path;
    if (rx.rows && rx.cols)
        RUN(rx.rows * rx.cols, nx_softmax(p, (const float *)rx.base, rx.rs, (float *)ry.base, ry.rs,
                                          rx.rows, rx.cols, scale, causal, q_rows));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

/* ---------- RMSNorm ---------- */

static int get_weight(held *h, PyObject *obj, size_t d, rview *rw)
{
    Py_buffer *w = get_buf(h, obj, "weight", DT_F32, 0);
    if (!w || contiguous(w, "weight")) return -1;
    if (w->ndim != 1 || (size_t)w->shape[0] != d) {
        char want[64];
        snprintf(want, sizeof want, "(%zu,)", d);
        return shape_error("weight", w, want);
    }
    *rw = flat_view(w);
    return 0;
}

static int get_eps(PyObject *o, float *eps)
{
    if (get_float(o, "eps", eps)) return -1;
    if (*eps < 0.0f) {
        PyErr_SetString(PyExc_ValueError, "eps must be >= 0");
        return -1;
    }
    return 0;
}

/* rmsnorm(x, weight, out, eps) */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 4, "rmsnorm")) return NULL;
    held h = {.n = 0};
    float eps;
    rview rx, rw, ry;
    Py_buffer *x = get_buf(&h, args[0], "x", DT_F32, 0), *y = NULL;
    if (!x || as_rows(x, "x", 1, &rx) || get_weight(&h, args[1], rx.cols, &rw) ||
        !(y = get_buf(&h, args[2], "out", DT_F32, 1)) || as_rows(y, "out", 1, &ry) || check_out_rows(&ry, "out"))
        goto fail;
    if (!same_shape(x, y)) {
        shape_error("out", y, "the shape of x");
        goto fail;
    }
    if (check_alias(&ry, "out", &rx, "x", 4, 1) || check_alias(&ry, "out", &rw, "weight", 4, 0) ||
        get_eps(args[3], &eps))
        goto fail;
    nx_path p = g_path;
    if (rx.rows && rx.cols)
        RUN(rx.rows * rx.cols, nx_rmsnorm(p, (const float *)rx.base, rx.rs, (const float *)rw.base,
                                          (float *)ry.base, ry.rs, rx.rows, rx.cols, eps));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

/* fused_add_rmsnorm(x, residual, weight, out, eps): residual += x; out = rmsnorm(residual) */
static PyObject *py_fused_add_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 5, "fused_add_rmsnorm")) return NULL;
    held h = {.n = 0};
    float eps;
    rview rx, rr, rw, ry;
    Py_buffer *x = get_buf(&h, args[0], "x", DT_F32, 0), *r = NULL, *y = NULL;
    if (!x || as_rows(x, "x", 1, &rx) || !(r = get_buf(&h, args[1], "residual", DT_F32, 1)) ||
        as_rows(r, "residual", 1, &rr) || check_out_rows(&rr, "residual") ||
        get_weight(&h, args[2], rx.cols, &rw) || !(y = get_buf(&h, args[3], "out", DT_F32, 1)) ||
        as_rows(y, "out", 1, &ry) || check_out_rows(&ry, "out"))
        goto fail;
    if (!same_shape(x, r)) {
        shape_error("residual", r, "the shape of x");
        goto fail;
    }
    if (!same_shape(x, y)) {
        shape_error("out", y, "the shape of x");
        goto fail;
    }
    if (check_alias(&ry, "out", &rx, "x", 4, 1) || check_alias(&rr, "residual", &rx, "x", 4, 0) ||
        check_alias(&ry, "out", &rr, "residual", 4, 0) || check_alias(&ry, "out", &rw, "weight", 4, 0) ||
        check_alias(&rr, "residual", &rw, "weight", 4, 0) || get_eps(args[4], &eps))
        goto fail;
    nx_path p = g_path;
    if (rx.rows && rx.cols)
        RUN(rx.rows * rx.cols,
            nx_fused_add_rmsnorm(p, (const float *)rx.base, rx.rs, (float *)rr.base, rr.rs, (const float *)rw.base,
                                 (float *)ry.base, ry.rs, rx.rows, rx.cols, eps));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

/* ---------- gated activations ---------- */

typedef void (*gated_fn)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, size_t, size_t);

static PyObject *gated(PyObject *const *args, Py_ssize_t nargs, const char *fn, gated_fn kernel)
{
    if (!nargs_ok(nargs, 2, fn)) return NULL;
    held h = {.n = 0};
    rview rx, ry;
    Py_buffer *x = get_buf(&h, args[0], "x", DT_F32, 0), *y = NULL;
    if (!x || as_rows(x, "x", 1, &rx)) goto fail;
    if (rx.cols % 2) {
        PyErr_Format(PyExc_ValueError, "x: last dimension must be even ([..., 2*d]), got %zu", rx.cols);
        goto fail;
    }
    if (!(y = get_buf(&h, args[1], "out", DT_F32, 1)) || as_rows(y, "out", 1, &ry) || check_out_rows(&ry, "out"))
        goto fail;
    int ok = y->ndim == x->ndim && (size_t)y->shape[y->ndim - 1] * 2 == rx.cols;
    for (int i = 0; ok && i < x->ndim - 1; i++) ok = y->shape[i] == x->shape[i];
    if (!ok) {
        shape_error("out", y, "x.shape[:-1] + (x.shape[-1] // 2,)");
        goto fail;
    }
    if (check_alias(&ry, "out", &rx, "x", 4, 0)) goto fail;
    nx_path p = g_path;
    if (ry.rows && ry.cols)
        RUN(rx.rows * rx.cols, kernel(p, (const float *)rx.base, rx.rs, (float *)ry.base, ry.rs, ry.rows, ry.cols));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

static PyObject *py_silu_and_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return gated(args, nargs, "silu_and_mul", nx_silu_and_mul);
}

static PyObject *py_gelu_tanh_and_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return gated(args, nargs, "gelu_tanh_and_mul", nx_gelu_tanh_and_mul);
}

/* ---------- RoPE ---------- */

/* rope(positions, query, key_or_None, head_size, rotary_dim, is_neox, cos_sin_cache_or_None, theta) */
static PyObject *py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 8, "rope")) return NULL;
    held h = {.n = 0};
    rview rq, rk = {0}, rc = {0};
    float theta = 0.0f;
    int is_neox;
    Py_ssize_t head_size = PyLong_AsSsize_t(args[3]), rot = PyLong_AsSsize_t(args[4]);
    if ((head_size == -1 || rot == -1) && PyErr_Occurred()) return NULL;
    if ((is_neox = PyObject_IsTrue(args[5])) < 0) return NULL;
    if (head_size <= 0 || rot <= 0 || rot > head_size || rot % 2) {
        PyErr_Format(PyExc_ValueError, "need head_size > 0 and an even rotary_dim in (0, head_size], got %zd and %zd",
                     head_size, rot);
        return NULL;
    }
    Py_buffer *pos = get_buf(&h, args[0], "positions", DT_I64, 0), *q = NULL, *k = NULL, *c = NULL;
    if (!pos || contiguous(pos, "positions")) goto fail;
    size_t ntok = numel(pos);
    if (!(q = get_buf(&h, args[1], "query", DT_F32, 1)) || as_rows(q, "query", q->ndim > 1 ? q->ndim - 1 : 1, &rq))
        goto fail;
    if (q->ndim < 2 || rq.rows != ntok || rq.cols % (size_t)head_size) {
        char want[96];
        snprintf(want, sizeof want, "(%zu, num_heads * %zd) or (%zu, num_heads, %zd)", ntok, head_size, ntok, head_size);
        shape_error("query", q, want);
        goto fail;
    }
    if (args[2] != Py_None) {
        if (!(k = get_buf(&h, args[2], "key", DT_F32, 1)) || as_rows(k, "key", k->ndim > 1 ? k->ndim - 1 : 1, &rk))
            goto fail;
        if (k->ndim < 2 || rk.rows != ntok || rk.cols % (size_t)head_size) {
            char want[96];
            snprintf(want, sizeof want, "(%zu, num_kv_heads * %zd) or (%zu, num_kv_heads, %zd)", ntok, head_size, ntok,
                     head_size);
            shape_error("key", k, want);
            goto fail;
        }
        if (check_alias(&rk, "key", &rq, "query", 4, 0)) goto fail;
    }
    if (args[6] != Py_None) {
        if (!(c = get_buf(&h, args[6], "cos_sin_cache", DT_F32, 0)) || contiguous(c, "cos_sin_cache")) goto fail;
        if (c->ndim != 2 || c->shape[1] != rot) {
            char want[64];
            snprintf(want, sizeof want, "(max_position, %zd)", rot);
            shape_error("cos_sin_cache", c, want);
            goto fail;
        }
        rc = (rview){c->buf, (size_t)c->shape[0], (size_t)rot, rot};
        if (check_alias(&rq, "query", &rc, "cos_sin_cache", 4, 0) ||
            (k && check_alias(&rk, "key", &rc, "cos_sin_cache", 4, 0)))
            goto fail;
    } else {
        if (get_float(args[7], "theta", &theta)) goto fail;
        if (theta <= 0.0f) {
            PyErr_SetString(PyExc_ValueError, "theta must be > 0");
            goto fail;
        }
    }
    int rc_code = NX_OK;
    nx_path p = g_path;
    if (ntok)
        RUN(ntok * (rq.cols + rk.cols),
            rc_code = nx_rope(p, pos->buf, ntok, (float *)rq.base, rq.rs, rq.cols / (size_t)head_size,
                              k ? (float *)rk.base : NULL, rk.rs, rk.cols / (size_t)head_size, (size_t)head_size,
                              (size_t)rot, is_neox, c ? (const float *)c->buf : NULL, rc.rows, theta));
    if (rc_code == NX_ERANGE) {
        PyErr_Format(PyExc_ValueError, "positions must lie in [0, %zu), the rows of cos_sin_cache", rc.rows);
        goto fail;
    }
    if (rc_code != NX_OK) {
        kernel_error(rc_code);
        goto fail;
    }
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

/* ---------- matmul ---------- */

/* matmul(a, b, out, trans_b) */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 4, "matmul")) return NULL;
    held h = {.n = 0};
    rview ra, rb, rcv;
    int trans_b = PyObject_IsTrue(args[3]);
    if (trans_b < 0) return NULL;
    Py_buffer *a = get_buf(&h, args[0], "a", DT_F32, 0), *b = NULL, *c = NULL;
    if (!a || as_rows(a, "a", 1, &ra) || !(b = get_buf(&h, args[1], "b", DT_F32, 0)) || as_rows(b, "b", 1, &rb) ||
        !(c = get_buf(&h, args[2], "out", DT_F32, 1)) || as_rows(c, "out", 1, &rcv) || check_out_rows(&rcv, "out"))
        goto fail;
    if (a->ndim != 2) {
        shape_error("a", a, "(M, K)");
        goto fail;
    }
    size_t M = (size_t)a->shape[0], K = (size_t)a->shape[1];
    if (b->ndim != 2 || (size_t)b->shape[trans_b ? 1 : 0] != K) {
        char want[64];
        snprintf(want, sizeof want, trans_b ? "(N, %zu) with trans_b" : "(%zu, N)", K);
        shape_error("b", b, want);
        goto fail;
    }
    size_t N = (size_t)b->shape[trans_b ? 0 : 1];
    if (c->ndim != 2 || (size_t)c->shape[0] != M || (size_t)c->shape[1] != N) {
        char want[64];
        snprintf(want, sizeof want, "(%zu, %zu)", M, N);
        shape_error("out", c, want);
        goto fail;
    }
    if (check_alias(&rcv, "out", &ra, "a", 4, 0) || check_alias(&rcv, "out", &rb, "b", 4, 0)) goto fail;
    int rc_code = NX_OK;
    nx_path p = g_path;
    RUN(M * N * (K + 1), rc_code = nx_matmul(p, M, N, K, a->buf, (size_t)ra.rs, b->buf, (size_t)rb.rs, trans_b,
                                             c->buf, (size_t)rcv.rs));
    if (rc_code != NX_OK) {
        kernel_error(rc_code);
        goto fail;
    }
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

/* ---------- FP8 ---------- */

static int get_fp8_args(PyObject *scale_obj, PyObject *fmt_obj, float *scale, int *fmt)
{
    if (get_float(scale_obj, "scale", scale)) return -1;
    if (!(*scale > 0.0f)) {
        PyErr_SetString(PyExc_ValueError, "scale must be > 0");
        return -1;
    }
    const char *f = PyUnicode_Check(fmt_obj) ? PyUnicode_AsUTF8(fmt_obj) : NULL;
    if (f && (strcmp(f, "e4m3") == 0 || strcmp(f, "e4m3fn") == 0)) {
        *fmt = NX_FP8_E4M3;
    } else if (f && strcmp(f, "e5m2") == 0) {
        *fmt = NX_FP8_E5M2;
    } else {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "fmt must be 'e4m3' or 'e5m2'");
        return -1;
    }
    return 0;
}

/* fp8_quantize(x, out, scale, fmt) / fp8_dequantize(q, out, scale, fmt) */
static PyObject *fp8(PyObject *const *args, Py_ssize_t nargs, int quantize)
{
    const char *fn = quantize ? "fp8_quantize" : "fp8_dequantize", *in_name = quantize ? "x" : "q";
    if (!nargs_ok(nargs, 4, fn)) return NULL;
    held h = {.n = 0};
    float scale;
    int fmt;
    dtype in_dt = quantize ? DT_F32 : DT_U8, out_dt = quantize ? DT_U8 : DT_F32;
    Py_buffer *x = get_buf(&h, args[0], in_name, in_dt, 0), *y = NULL;
    if (!x || contiguous(x, in_name) || !(y = get_buf(&h, args[1], "out", out_dt, 1)) || contiguous(y, "out"))
        goto fail;
    if (!same_shape(x, y)) {
        shape_error("out", y, quantize ? "the shape of x" : "the shape of q");
        goto fail;
    }
    /* in bytes: input and output elements differ in size */
    size_t n = numel(x);
    rview rx = {x->buf, 1, n * (size_t)x->itemsize, (ptrdiff_t)(n * (size_t)x->itemsize)};
    rview ry = {y->buf, 1, n * (size_t)y->itemsize, (ptrdiff_t)(n * (size_t)y->itemsize)};
    if (check_alias(&ry, "out", &rx, in_name, 1, 0) || get_fp8_args(args[2], args[3], &scale, &fmt)) goto fail;
    nx_path p = g_path;
    if (quantize)
        RUN(n, nx_fp8_quantize(p, x->buf, y->buf, n, scale, fmt));
    else
        RUN(n, nx_fp8_dequantize(p, x->buf, y->buf, n, scale, fmt));
    release_all(&h);
    Py_RETURN_NONE;
fail:
    release_all(&h);
    return NULL;
}

static PyObject *py_fp8_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return fp8(args, nargs, 1);
}

static PyObject *py_fp8_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return fp8(args, nargs, 0);
}

/* ---------- paths ---------- */

static PyObject *py_info(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *compiled = PyList_New(0), *supported = PyList_New(0);
    if (!compiled || !supported) goto fail;
    for (int p = NX_SCALAR; p <= NX_NEON; p++) {
        PyObject *name = PyUnicode_FromString(nx_path_name((nx_path)p));
        if (!name) goto fail;
        int err = (nx_path_compiled((nx_path)p) && PyList_Append(compiled, name)) ||
                  (nx_path_supported((nx_path)p) && PyList_Append(supported, name));
        Py_DECREF(name);
        if (err) goto fail;
    }
#if defined(__aarch64__)
    const char *arch = "aarch64";
#elif defined(__x86_64__)
    const char *arch = "x86_64";
#else
    const char *arch = "other";
#endif
    PyObject *d = Py_BuildValue("{s:s,s:s,s:s,s:N,s:N,s:{s:O,s:O}}",
                                "path", nx_path_name(g_path), "best_path", nx_path_name(nx_best_path()),
                                "arch", arch, "compiled_paths", compiled, "supported_paths", supported,
                                "cpu", "avx2_fma_f16c", nx_cpu_has_avx2_fma() ? Py_True : Py_False,
                                "neon", NX_HAVE_NEON ? Py_True : Py_False);
    return d;
fail:
    Py_XDECREF(compiled);
    Py_XDECREF(supported);
    return NULL;
}

static PyObject *py_set_path(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "path must be a str");
        return NULL;
    }
    for (int p = NX_SCALAR; p <= NX_NEON; p++) {
        if (strcmp(name, nx_path_name((nx_path)p)) != 0) continue;
        if (!nx_path_supported((nx_path)p)) {
            PyErr_Format(PyExc_ValueError, "path '%s' is not %s", name,
                         nx_path_compiled((nx_path)p) ? "supported by this CPU" : "compiled into this build");
            return NULL;
        }
        g_path = (nx_path)p;
        Py_RETURN_NONE;
    }
    PyErr_Format(PyExc_ValueError, "unknown path '%s' (scalar, avx2, neon)", name);
    return NULL;
}

static PyObject *py_get_path(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(nx_path_name(g_path));
}

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST("exp", py_exp, "exp(x, out)"),
    FAST("softmax", py_softmax, "softmax(x, out, scale, causal)"),
    FAST("rmsnorm", py_rmsnorm, "rmsnorm(x, weight, out, eps)"),
    FAST("fused_add_rmsnorm", py_fused_add_rmsnorm, "fused_add_rmsnorm(x, residual, weight, out, eps)"),
    FAST("silu_and_mul", py_silu_and_mul, "silu_and_mul(x, out)"),
    FAST("gelu_tanh", py_gelu_tanh, "gelu_tanh(x, out)"),
    FAST("gelu_tanh_and_mul", py_gelu_tanh_and_mul, "gelu_tanh_and_mul(x, out)"),
    FAST("rope", py_rope, "rope(positions, query, key, head_size, rotary_dim, is_neox, cos_sin_cache, theta)"),
    FAST("matmul", py_matmul, "matmul(a, b, out, trans_b)"),
    FAST("fp8_quantize", py_fp8_quantize, "fp8_quantize(x, out, scale, fmt)"),
    FAST("fp8_dequantize", py_fp8_dequantize, "fp8_dequantize(q, out, scale, fmt)"),
    {"info", py_info, METH_NOARGS, "Active SIMD path and what this build and CPU support."},
    {"set_path", py_set_path, METH_O, "set_path(name): force 'scalar', 'avx2' or 'neon'."},
    {"get_path", py_get_path, METH_NOARGS, "Name of the active SIMD path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "SIMD kernels (NEON / AVX2+FMA / portable C); see neon_ext.", -1, methods,
    NULL, NULL, NULL, NULL,
};

static const nx_capi capi = {
    NX_CAPI_VERSION, &g_path, nx_softmax, nx_rmsnorm, nx_fused_add_rmsnorm,
    nx_silu_and_mul, nx_gelu_tanh_and_mul, nx_rope,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    g_path = nx_best_path();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *capsule = PyCapsule_New((void *)&capi, NX_CAPI_NAME, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
