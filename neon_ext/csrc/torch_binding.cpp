/* neon_ext._torch: the kernels on torch tensors, with results allocated by torch.
 *
 * The general binding (module.c) sees a torch tensor through a NumPy view: making
 * that view costs about 0.7 us and wrapping a result back as a tensor about 0.6 us,
 * more than the kernel itself at decode sizes.  This module reads tensors directly
 * and allocates results with ATen.  It takes the common case only: CPU float32
 * tensors (exactly torch.Tensor, no autograd) whose last dimension is contiguous and
 * whose leading dimensions collapse into rows.  For anything else every function
 * returns None and the Python wrapper takes the general path, which is also where
 * every error message comes from.
 *
 * The kernels, and the active path that set_path() changes, come from
 * neon_ext._kernels through its capsule (nx_capi.h): one copy of each. */
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <utility>
#include <vector>

#include "nx_capi.h"
#include "nx_rows.h"

namespace {

const nx_capi *api;

/* obj as a tensor our kernels can take as is, or nullptr. */
const at::Tensor *plain(PyObject *obj, at::ScalarType dtype)
{
    if (!THPVariable_CheckExact(obj)) return nullptr;
    const at::Tensor &t = THPVariable_Unpack(obj);
    if (t.scalar_type() != dtype || !t.device().is_cpu() || t.layout() != at::kStrided || t.requires_grad() ||
        t.is_neg() || t.dim() < 1 || t.numel() == 0)
        return nullptr;
    return &t;
}

/* t as rows: its last ncd dimensions contiguous, the leading ones collapsing into
 * rows at least a row apart (so an output's rows never overlap). */
bool as_rows(const at::Tensor &t, int64_t ncd, rview *r)
{
    const auto sizes = t.sizes(), strides = t.strides();
    const int64_t nd = t.dim();
    if (ncd < 1 || nd < ncd) return false;
    int64_t cols = 1;
    for (int64_t i = nd - 1; i >= nd - ncd; i--) {
        if (sizes[i] != 1 && strides[i] != cols) return false;
        cols *= sizes[i];
    }
    int64_t rows = 1, rs = -1, expect = 0;
    for (int64_t i = nd - ncd - 1; i >= 0; i--) {
        if (sizes[i] == 1) continue;
        if (rs < 0) {
            rs = expect = strides[i];
            if (rs < cols) return false;
        } else if (strides[i] != expect) {
            return false;
        }
        expect *= sizes[i];
        rows *= sizes[i];
    }
    r->base = static_cast<char *>(t.data_ptr());
    r->rows = static_cast<size_t>(rows);
    r->cols = static_cast<size_t>(cols);
    r->rs = rs < 0 ? cols : rs;
    return true;
}

bool float_rows(PyObject *obj, const at::Tensor **t, rview *r)
{
    return (*t = plain(obj, at::kFloat)) && as_rows(**t, 1, r);
}

/* A contiguous 1-D float32 tensor of length d. */
bool weight_view(PyObject *obj, size_t d, rview *r)
{
    const at::Tensor *w = plain(obj, at::kFloat);
    if (!w || w->dim() != 1 || static_cast<size_t>(w->size(0)) != d || w->stride(0) != 1) return false;
    *r = rview{static_cast<char *>(w->data_ptr()), 1, d, static_cast<ptrdiff_t>(d)};
    return true;
}

bool finite_float(PyObject *obj, float *out)
{
    double d = PyFloat_AsDouble(obj);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    *out = static_cast<float>(d);
    return std::isfinite(d);
}

bool nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *fn)
{
    if (nargs == want) return true;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", fn, want, nargs);
    return false;
}

/* Run the kernel without the GIL once the work is worth a thread switch. */
template <typename F>
void run(size_t work, F &&kernel)
{
    if (work >= NX_NOGIL_MIN_WORK) {
        Py_BEGIN_ALLOW_THREADS kernel();
        Py_END_ALLOW_THREADS
    } else {
        kernel();
    }
}

at::Tensor new_float(at::IntArrayRef sizes)
{
    return at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
}

/* softmax(x, scale, causal) -> new tensor | None */
PyObject *softmax(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok(nargs, 3, "softmax")) return nullptr;
    const at::Tensor *x;
    rview rx;
    float scale;
    int causal = PyObject_IsTrue(args[2]);
    if (causal < 0) PyErr_Clear();
    if (causal < 0 || !float_rows(args[0], &x, &rx) || !finite_float(args[1], &scale)) Py_RETURN_NONE;
    at::Tensor y = new_float(x->sizes());
    float *yp = y.mutable_data_ptr<float>();
    const size_t q_rows = x->dim() >= 2 ? static_cast<size_t>(x->size(-2)) : 1;
    const nx_path p = *api->path;
    run(rx.rows * rx.cols, [&] {
        api->softmax(p, reinterpret_cast<const float *>(rx.base), rx.rs, yp, rx.cols, rx.rows, rx.cols, scale,
                     causal, q_rows);
    });
    return THPVariable_Wrap(std::move(y));
}

/* rmsnorm(x, weight, eps) -> new tensor | None */
PyObject *rmsnorm(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok(nargs, 3, "rmsnorm")) return nullptr;
    const at::Tensor *x;
    rview rx, rw;
    float eps;
    if (!float_rows(args[0], &x, &rx) || !weight_view(args[1], rx.cols, &rw) || !finite_float(args[2], &eps) ||
        eps < 0.0f)
        Py_RETURN_NONE;
    at::Tensor y = new_float(x->sizes());
    float *yp = y.mutable_data_ptr<float>();
    const nx_path p = *api->path;
    run(rx.rows * rx.cols, [&] {
        api->rmsnorm(p, reinterpret_cast<const float *>(rx.base), rx.rs, reinterpret_cast<const float *>(rw.base), yp,
                     rx.cols, rx.rows, rx.cols, eps);
    });
    return THPVariable_Wrap(std::move(y));
}

/* fused_add_rmsnorm(x, residual, weight, eps, in_place) -> out | None: residual += x,
 * out = rmsnorm(residual), where out is x itself when in_place, else a new tensor. */
PyObject *fused_add_rmsnorm(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok(nargs, 5, "fused_add_rmsnorm")) return nullptr;
    const at::Tensor *x, *res;
    rview rx, rr, rw;
    float eps;
    int in_place = PyObject_IsTrue(args[4]);
    if (in_place < 0) PyErr_Clear();
    if (in_place < 0 || !float_rows(args[0], &x, &rx) || !float_rows(args[1], &res, &rr) ||
        res->sizes() != x->sizes() || !weight_view(args[2], rx.cols, &rw) || !finite_float(args[3], &eps) ||
        eps < 0.0f || nx_rows_overlap(&rr, &rx, 4) || nx_rows_overlap(&rr, &rw, 4) ||
        (in_place && nx_rows_overlap(&rx, &rw, 4)))
        Py_RETURN_NONE;
    at::Tensor y = in_place ? *x : new_float(x->sizes());
    rview ry = in_place ? rx : rview{static_cast<char *>(y.data_ptr()), rx.rows, rx.cols, static_cast<ptrdiff_t>(rx.cols)};
    const nx_path p = *api->path;
    run(rx.rows * rx.cols, [&] {
        api->fused_add_rmsnorm(p, reinterpret_cast<const float *>(rx.base), rx.rs, reinterpret_cast<float *>(rr.base),
                               rr.rs, reinterpret_cast<const float *>(rw.base), reinterpret_cast<float *>(ry.base),
                               ry.rs, rx.rows, rx.cols, eps);
    });
    if (in_place) {
        Py_INCREF(args[0]);
        return args[0];
    }
    return THPVariable_Wrap(std::move(y));
}

using gated_fn = void (*)(nx_path, const float *, ptrdiff_t, float *, ptrdiff_t, size_t, size_t);

/* act(x[..., :d]) * x[..., d:] -> new [..., d] tensor | None */
PyObject *gated(PyObject *const *args, Py_ssize_t nargs, const char *fn, gated_fn kernel)
{
    if (!nargs_ok(nargs, 1, fn)) return nullptr;
    const at::Tensor *x;
    rview rx;
    if (!float_rows(args[0], &x, &rx) || rx.cols % 2) Py_RETURN_NONE;
    std::vector<int64_t> sizes(x->sizes().begin(), x->sizes().end());
    const size_t d = rx.cols / 2;
    sizes.back() = static_cast<int64_t>(d);
    at::Tensor y = new_float(sizes);
    float *yp = y.mutable_data_ptr<float>();
    const nx_path p = *api->path;
    run(rx.rows * rx.cols, [&] { kernel(p, reinterpret_cast<const float *>(rx.base), rx.rs, yp, d, rx.rows, d); });
    return THPVariable_Wrap(std::move(y));
}

PyObject *silu_and_mul(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    return gated(args, nargs, "silu_and_mul", api->silu_and_mul);
}

PyObject *gelu_tanh_and_mul(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    return gated(args, nargs, "gelu_tanh_and_mul", api->gelu_tanh_and_mul);
}

/* query or key: [tokens, heads * head_size] or [tokens, heads, head_size], rows in place */
bool rope_operand(PyObject *obj, size_t ntok, size_t head_size, rview *r)
{
    const at::Tensor *t = plain(obj, at::kFloat);
    return t && t->dim() >= 2 && as_rows(*t, t->dim() - 1, r) && r->rows == ntok && r->cols % head_size == 0;
}

/* rope(positions, query, key, head_size, rotary_dim, is_neox, cos_sin_cache) -> True | None,
 * rotating query and key in place (the cache path only; theta takes the general path). */
PyObject *rope(PyObject *, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok(nargs, 7, "rope")) return nullptr;
    const long head_size = PyLong_AsLong(args[3]), rot = PyLong_AsLong(args[4]);
    const int is_neox = PyObject_IsTrue(args[5]);
    if (PyErr_Occurred()) PyErr_Clear();
    const at::Tensor *pos = plain(args[0], at::kLong), *cache = plain(args[6], at::kFloat);
    if (is_neox < 0 || head_size <= 0 || rot <= 0 || rot > head_size || rot % 2 || !pos || !pos->is_contiguous() ||
        !cache || cache->dim() != 2 || cache->size(1) != rot || !cache->is_contiguous())
        Py_RETURN_NONE;
    const size_t ntok = static_cast<size_t>(pos->numel()), hs = static_cast<size_t>(head_size);
    rview rq, rk{}, rc{static_cast<char *>(cache->data_ptr()), static_cast<size_t>(cache->size(0)),
                      static_cast<size_t>(rot), rot};
    const bool has_key = args[2] != Py_None;
    if (!rope_operand(args[1], ntok, hs, &rq) || nx_rows_overlap(&rq, &rc, 4) ||
        (has_key && (!rope_operand(args[2], ntok, hs, &rk) || nx_rows_overlap(&rk, &rq, 4) ||
                     nx_rows_overlap(&rk, &rc, 4))))
        Py_RETURN_NONE;
    const nx_path p = *api->path;
    int rc_code = NX_OK;
    run(ntok * (rq.cols + rk.cols), [&] {
        rc_code = api->rope(p, pos->const_data_ptr<int64_t>(), ntok, reinterpret_cast<float *>(rq.base), rq.rs,
                            rq.cols / hs, has_key ? reinterpret_cast<float *>(rk.base) : nullptr, rk.rs,
                            rk.cols / hs, hs, static_cast<size_t>(rot), is_neox,
                            reinterpret_cast<const float *>(rc.base), rc.rows, 0.0f);
    });
    if (rc_code != NX_OK) Py_RETURN_NONE; /* a position outside the cache: nothing was written */
    Py_RETURN_TRUE;
}

#define FAST(name, fn, doc) {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn)), METH_FASTCALL, doc}

PyMethodDef methods[] = {
    FAST("softmax", softmax, "softmax(x, scale, causal) -> Tensor | None"),
    FAST("rmsnorm", rmsnorm, "rmsnorm(x, weight, eps) -> Tensor | None"),
    FAST("fused_add_rmsnorm", fused_add_rmsnorm, "fused_add_rmsnorm(x, residual, weight, eps, in_place) -> Tensor | None"),
    FAST("silu_and_mul", silu_and_mul, "silu_and_mul(x) -> Tensor | None"),
    FAST("gelu_tanh_and_mul", gelu_tanh_and_mul, "gelu_tanh_and_mul(x) -> Tensor | None"),
    FAST("rope", rope, "rope(positions, query, key, head_size, rotary_dim, is_neox, cos_sin_cache) -> True | None"),
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_torch", "neon_ext kernels on torch tensors (the common case; None means: use the general path).",
    -1, methods, nullptr, nullptr, nullptr, nullptr,
};

} // namespace

PyMODINIT_FUNC PyInit__torch(void)
{
    api = static_cast<const nx_capi *>(PyCapsule_Import(NX_CAPI_NAME, 0));
    if (!api) return nullptr;
    if (api->version != NX_CAPI_VERSION) {
        PyErr_Format(PyExc_ImportError, "neon_ext._kernels exports kernel table version %u, _torch expects %d",
                     api->version, NX_CAPI_VERSION);
        return nullptr;
    }
    return PyModule_Create(&module_def);
}
