"""SIMD kernels for CPU inference: NEON on aarch64, AVX2/FMA on x86-64, portable C elsewhere.

The path is chosen once at import from the CPU's features; ``info()`` reports it and
``set_path()`` (or the environment variable ``NEON_EXT_FORCE=scalar|avx2|neon``) forces
another compiled path, which the tests use to check every path on one machine.

Every function takes NumPy arrays or CPU torch tensors in float32, writes into
``out=`` when given (else allocates the result, of the same kind as the input) and
releases the GIL while it works on large inputs.  Torch tensors in the common case
(float32, no autograd, rows with a contiguous last dimension) go straight to the
kernels through ``neon_ext._torch``, a small C++ binding against the installed torch
that allocates results with ATen; anything else goes through zero-copy ``.numpy()``
views, as does everything when that binding is not built.  A wrong dtype raises
TypeError; a wrong shape, a layout whose last dimension is not contiguous or
overlapping outputs raise ValueError.  Row-wise kernels accept
views whose leading dimensions collapse into one row stride, e.g. q/k slices of qkv.

Build in place with ``python neon_ext/build.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from . import _kernels

__all__ = [
    "info", "set_path", "get_path", "exp", "softmax", "rmsnorm", "fused_add_rmsnorm",
    "silu_and_mul", "swiglu", "gelu_tanh", "gelu_and_mul", "rope", "matmul",
    "fp8_quantize", "fp8_dequantize", "FP8_MAX",
]

#: Largest finite value of each FP8 format.
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}

set_path = _kernels.set_path
get_path = _kernels.get_path

_FORCED = os.environ.get("NEON_EXT_FORCE") or None
if _FORCED:
    set_path(_FORCED)


def info() -> dict:
    """Active path, the best path for this CPU, compiled/supported paths, CPU features, and
    whether torch tensors take the direct binding (None until torch has been imported)."""
    if "torch" in sys.modules:
        _bind_torch()
    return {**_kernels.info(), "forced_by_env": _FORCED,
            "torch_binding": (_fast is not None) if _torch_seen else None}


class _NoTensor:
    """The type no input has: what the wrappers compare against while the binding is not loaded."""


#: neon_ext._torch once loaded (on the first torch tensor: neon_ext never imports torch itself)
#: and the exact type it serves, torch.Tensor.  Each wrapper hands inputs of exactly that type
#: to _fast first, inline because these calls are the decode hot path; _fast answers None for
#: what it does not take, and the wrapper goes on to the general path.
_fast = None
_FastTensor: type = _NoTensor
_torch_seen = False


def _bind_torch() -> None:
    """Load the torch binding: on the first torch tensor, since importing it loads libtorch."""
    global _fast, _FastTensor, _torch_seen
    if _torch_seen:
        return
    _torch_seen = True
    import torch

    try:
        from . import _torch as fast
    except ImportError:  # not built, or built against another torch: the NumPy-view path serves
        return
    _fast, _FastTensor = fast, torch.Tensor


def _np(x, name: str):
    """(ndarray view of x, whether x is a torch tensor).  No copies."""
    if isinstance(x, np.ndarray):
        return x, False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        _bind_torch()
        try:
            return x.numpy(), True  # the common case, kept cheap: decode steps call this per layer
        except (TypeError, RuntimeError):
            pass
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor, got device {x.device}") from None
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.view(torch.uint8)
        try:
            return x.detach().numpy(), True
        except TypeError:
            raise TypeError(f"{name} must have dtype float32 (uint8/float8 for FP8 codes), got {x.dtype}") from None
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _result(out, out_arr: np.ndarray, as_torch: bool):
    """The caller's out object, or the new array (as a tensor if the input was one)."""
    if out is not None:
        return out
    if as_torch:
        import torch

        return torch.from_numpy(out_arr)
    return out_arr


def _out(out, shape, dtype):
    if out is None:
        return np.empty(shape, dtype)
    return _np(out, "out")[0]


def _shape(x: np.ndarray, name: str, min_ndim: int = 1):
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    return x.shape


def exp(x, out=None):
    """Element-wise exp (vectorised polynomial, within 2 ULP; subnormal results flush to 0)."""
    xa, t = _np(x, "x")
    oa = _out(out, xa.shape, np.float32)
    _kernels.exp(xa, oa)
    return _result(out, oa, t)


def softmax(x, scale: float = 1.0, causal: bool = False, out=None):
    """Softmax of ``scale * x`` over the last axis, numerically stable.

    With ``causal``, row i of each [q, k] matrix (the last two axes) keeps columns
    j <= i + k - q (queries are the last q of k positions); masked entries are 0.
    """
    if out is None and type(x) is _FastTensor and (y := _fast.softmax(x, scale, causal)) is not None:
        return y
    xa, t = _np(x, "x")
    oa = _out(out, _shape(xa, "x"), np.float32)
    _kernels.softmax(xa, oa, scale, causal)
    return _result(out, oa, t)


def rmsnorm(x, weight, eps: float = 1e-6, out=None):
    """``x / sqrt(mean(x**2, -1) + eps) * weight``; ``out=x`` works in place."""
    if out is None and type(x) is _FastTensor and (y := _fast.rmsnorm(x, weight, eps)) is not None:
        return y
    xa, t = _np(x, "x")
    wa = _np(weight, "weight")[0]
    oa = _out(out, _shape(xa, "x"), np.float32)
    _kernels.rmsnorm(xa, wa, oa, eps)
    return _result(out, oa, t)


def fused_add_rmsnorm(x, residual, weight, eps: float = 1e-6, out=None):
    """``residual += x`` in place, then ``out = rmsnorm(residual)``; returns (out, residual).

    ``out=x`` gives vLLM's fully in-place behaviour.
    """
    if ((out is None or out is x) and type(x) is _FastTensor
            and (y := _fast.fused_add_rmsnorm(x, residual, weight, eps, out is x)) is not None):
        return y, residual
    xa, t = _np(x, "x")
    ra = _np(residual, "residual")[0]
    wa = _np(weight, "weight")[0]
    oa = _out(out, _shape(xa, "x"), np.float32)
    _kernels.fused_add_rmsnorm(xa, ra, wa, oa, eps)
    return _result(out, oa, t), residual


def _gated(name: str, x, out):
    """act(x[..., :d]) * x[..., d:] by the kernel of that name in both bindings."""
    if out is None and type(x) is _FastTensor and (y := getattr(_fast, name)(x)) is not None:
        return y
    xa, t = _np(x, "x")
    shape = _shape(xa, "x")
    oa = _out(out, shape[:-1] + (shape[-1] // 2,), np.float32)
    getattr(_kernels, name)(xa, oa)
    return _result(out, oa, t)


def silu_and_mul(x, out=None):
    """Fused SwiGLU: ``silu(x[..., :d]) * x[..., d:]`` for x of shape [..., 2*d]."""
    return _gated("silu_and_mul", x, out)


swiglu = silu_and_mul


def gelu_tanh(x, out=None):
    """GeLU, tanh approximation: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x**3)))``."""
    xa, t = _np(x, "x")
    oa = _out(out, xa.shape, np.float32)
    _kernels.gelu_tanh(xa, oa)
    return _result(out, oa, t)


def gelu_and_mul(x, approximate: str = "tanh", out=None):
    """Fused GeGLU: ``gelu(x[..., :d]) * x[..., d:]`` (tanh approximation only)."""
    if approximate != "tanh":
        raise ValueError(f"only approximate='tanh' is implemented, got {approximate!r}")
    return _gated("gelu_tanh_and_mul", x, out)


def rope(positions, query, key=None, *, head_size: int, rotary_dim: int | None = None,
         cos_sin_cache=None, theta: float = 10000.0, is_neox: bool = True):
    """Rotary embedding applied in place to query (and key); returns (query, key).

    query/key: [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size]
    (views into a fused qkv tensor are fine).  The first ``rotary_dim`` (default
    head_size) features of each head rotate, NeoX layout (two halves) or GPT-J
    (``is_neox=False``, interleaved pairs).  cos/sin come from ``cos_sin_cache``
    ([max_position, rotary_dim], cos half then sin half, as vLLM builds it) or are
    computed from ``theta``.
    """
    rot = head_size if rotary_dim is None else rotary_dim
    if (cos_sin_cache is not None and type(query) is _FastTensor
            and _fast.rope(positions, query, key, head_size, rot, is_neox, cos_sin_cache)):
        return query, key
    pa = _np(positions, "positions")[0].reshape(-1)
    if pa.dtype != np.int64:
        if pa.dtype.kind not in "iu":
            raise TypeError(f"positions must be an integer array, got {pa.dtype}")
        pa = pa.astype(np.int64)
    qa = _np(query, "query")[0]
    ka = None if key is None else _np(key, "key")[0]
    ca = None if cos_sin_cache is None else _np(cos_sin_cache, "cos_sin_cache")[0]
    _kernels.rope(pa, qa, ka, head_size, rot, is_neox, ca, theta)
    return query, key


def matmul(a, b, trans_b: bool = False, out=None):
    """``a @ b`` in float32; with ``trans_b`` b is stored [N, K] (a linear layer's weight)."""
    aa, t = _np(a, "a")
    ba = _np(b, "b")[0]
    if aa.ndim != 2 or ba.ndim != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {aa.shape} and {ba.shape}")
    n = ba.shape[0] if trans_b else ba.shape[1]
    oa = _out(out, (aa.shape[0], n), np.float32)
    _kernels.matmul(aa, ba, oa, trans_b)
    return _result(out, oa, t)


def fp8_quantize(x, scale: float = 1.0, fmt: str = "e4m3", out=None):
    """FP8 codes (uint8) of ``x / scale``: round to nearest even, saturating at the
    format's largest finite value (also for inf), NaN kept.  fmt: 'e4m3' or 'e5m2'.
    A torch input gives a torch.float8_e4m3fn / float8_e5m2 tensor."""
    xa, t = _np(x, "x")
    oa = _out(out, xa.shape, np.uint8)
    _kernels.fp8_quantize(xa, oa, scale, fmt)
    if out is None and t:
        import torch

        dt = torch.float8_e5m2 if fmt == "e5m2" else torch.float8_e4m3fn
        return torch.from_numpy(oa).view(dt)
    return _result(out, oa, t)


def fp8_dequantize(q, scale: float = 1.0, fmt: str = "e4m3", out=None):
    """float32 values of FP8 codes (uint8 array or torch float8/uint8 tensor) times ``scale``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor) and q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q = q.view(torch.uint8)  # NumPy has no float8; same bytes
    qa, t = _np(q, "q")
    oa = _out(out, qa.shape, np.float32)
    _kernels.fp8_dequantize(qa, oa, scale, fmt)
    return _result(out, oa, t)
