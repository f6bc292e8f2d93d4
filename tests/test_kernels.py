"""neon_ext kernels against NumPy references, on every SIMD path compiled into this build and
supported by this CPU (here: scalar and AVX2; NEON is checked by tests/test_kernels_neon.py).

Stated tolerances:
  exp                 relative 1e-6 (and at most 2 ULP) against float64
  softmax             relative 1e-6 against float64
  rmsnorm, activations relative 1e-5 against float64
  rope                bit-exact against vLLM's float32 formula given the same cos/sin cache
  matmul              |C - ref| <= K * 2^-24 * (|A| @ |B|), the worst-case float32 bound for K-term sums
  fp8                 bit-exact (all 256 codes, round trips, random values and ties against torch)
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import neon_ext
except ImportError as exc:  # pragma: no cover - only when the extension was not built
    raise ImportError("neon_ext is not built: run `python neon_ext/build.py`") from exc

REPO = Path(__file__).resolve().parent.parent
PATHS = neon_ext.info()["supported_paths"]
SIZES = [1, 3, 7, 8, 9, 63, 64, 65, 4095]
U32 = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(params=PATHS)
def path(request):
    previous = neon_ext.get_path()
    neon_ext.set_path(request.param)
    yield request.param
    neon_ext.set_path(previous)


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0, scale=1.0):
    return (rng(seed).standard_normal(shape) * scale).astype(np.float32)


def assert_rel(got, ref, rtol, atol=0.0):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    err = np.abs(got - ref)
    bound = rtol * np.abs(ref) + atol
    bad = ~(err <= bound)
    assert not bad.any(), f"{bad.sum()} of {bad.size} beyond rtol={rtol}: worst rel {np.max(err / np.maximum(np.abs(ref), 1e-300)):.3g}"


# ---------------------------------------------------------------- dispatch


def test_info_reports_paths():
    info = neon_ext.info()
    assert info["path"] in info["supported_paths"]
    assert set(info["supported_paths"]) <= set(info["compiled_paths"])
    assert "scalar" in info["compiled_paths"]
    if info["arch"] == "x86_64":
        assert "avx2" in info["compiled_paths"]
        assert ("avx2" in info["supported_paths"]) == info["cpu"]["avx2_fma_f16c"]
        assert info["best_path"] == ("avx2" if info["cpu"]["avx2_fma_f16c"] else "scalar")
    if info["arch"] == "aarch64":
        assert info["best_path"] == "neon"


def test_set_path_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="unknown path"):
        neon_ext.set_path("sse9")
    with pytest.raises(TypeError):
        neon_ext.set_path(3)
    for name in {"scalar", "avx2", "neon"} - set(PATHS):
        with pytest.raises(ValueError, match="not"):
            neon_ext.set_path(name)


@pytest.mark.parametrize("forced", PATHS)
def test_env_var_forces_path(forced):
    env = {**os.environ, "NEON_EXT_FORCE": forced, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", "import neon_ext; i = neon_ext.info(); print(i['path'], i['forced_by_env'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [forced, forced]


# ---------------------------------------------------------------- exp / softmax


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return np.abs(ia - ib)


@pytest.mark.parametrize("n", SIZES + [100_003])
def test_exp_accuracy(path, n):
    x = np.linspace(-87.0, 88.3, n, dtype=np.float32)
    rng(n).shuffle(x)
    ref = np.exp(x.astype(np.float64))
    got = neon_ext.exp(x)
    assert_rel(got, ref, 1e-6)
    assert ulp_distance(got, ref.astype(np.float32)).max() <= 2


def test_exp_special_values(path):
    x = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 88.8, 100.0, -87.4, -200.0, 1e-30, -1e-30, 88.37, -87.33],
                 dtype=np.float32)
    got = neon_ext.exp(np.tile(x, 3))[: len(x)]  # tiled so both the SIMD body and the scalar tail see them
    assert got[0] == 1.0 and got[1] == 1.0
    assert got[4] == np.inf and got[5] == 0.0 and np.isnan(got[6])
    assert got[7] == np.inf and got[8] == np.inf  # overflow
    assert got[9] == 0.0 and got[10] == 0.0  # results below FLT_MIN flush to zero
    assert got[11] == 1.0 and got[12] == 1.0
    assert_rel(got[[2, 3, 13, 14]], np.exp(x[[2, 3, 13, 14]].astype(np.float64)), 1e-6)


def softmax_ref(x, scale=1.0, causal=False):
    x = x.astype(np.float64) * scale
    if causal:
        q, k = x.shape[-2], x.shape[-1]
        mask = np.arange(k)[None, :] > np.arange(q)[:, None] + (k - q)
        x = np.where(mask, -np.inf, x)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


@pytest.mark.parametrize("cols", SIZES)
@pytest.mark.parametrize("scale", [1.0, 0.125, -2.0])
def test_softmax(path, cols, scale):
    x = randn(5, cols, seed=cols, scale=4.0)
    got = neon_ext.softmax(x, scale=scale)
    assert_rel(got, softmax_ref(x, scale), 1e-6)
    assert np.allclose(got.sum(-1), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width", [15.99, 16.01, 40.0])  # AVX2 skips the TwoSum term below a row range of 16
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_softmax_row_range_either_side_of_the_exact_threshold(path, width, scale):
    # the max near 0.7 and the rest far below: x*scale - max then rounds by up to half an ulp of the result
    r = rng(7)
    scale = np.float32(scale)
    for cols in (9, 64, 4095):
        x = ((0.7 - r.uniform(0, width, (6, cols))) / scale).astype(np.float32)
        x[:, 0] = x.max()  # pin the range at the requested width
        x[:, 1] = x[:, 0] - np.float32(width / scale)
        assert_rel(neon_ext.softmax(x, scale=float(scale)), softmax_ref(x, scale), 1e-6)


def test_softmax_large_inputs_and_neg_inf(path):
    x = randn(3, 65, seed=1, scale=1e4)
    x[1, ::3] = -np.inf
    got = neon_ext.softmax(x)
    assert np.all(np.isfinite(got))
    assert np.all(got[1, ::3] == 0.0)
    assert_rel(got, softmax_ref(x), 1e-6, atol=1e-30)


@pytest.mark.parametrize("q,k", [(1, 1), (7, 7), (9, 65), (64, 64), (3, 4095)])
def test_softmax_causal(path, q, k):
    x = randn(2, q, k, seed=q * k)
    got = neon_ext.softmax(x, scale=0.5, causal=True)
    ref = softmax_ref(x, 0.5, causal=True)
    assert_rel(got, ref, 1e-6)
    assert np.all(got[ref == 0] == 0.0)


def test_softmax_causal_more_queries_than_keys(path):
    got = neon_ext.softmax(randn(5, 3), causal=True)
    assert np.all(got[:2] == 0.0)  # rows that see no key are all zero, not NaN
    assert_rel(got[2:], softmax_ref(randn(5, 3), causal=True)[2:], 1e-6)


def test_softmax_in_place_and_strided_rows(path):
    base = randn(6, 80, seed=3)
    x = base[:, 5:70]  # rows 80 apart, 65 contiguous
    ref = softmax_ref(x.copy())
    out = neon_ext.softmax(x, out=x)
    assert out is x
    assert_rel(base[:, 5:70], ref, 1e-6)


# ---------------------------------------------------------------- RMSNorm


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("d", SIZES + [576, 2048, 4096])
def test_rmsnorm(path, d):
    x, w = randn(4, d, seed=d, scale=3.0), randn(d, seed=d + 1)
    assert_rel(neon_ext.rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5), 1e-5)


def test_rmsnorm_3d_in_place_and_eps_dominated(path):
    x, w = randn(2, 3, 65, seed=5), randn(65, seed=6)
    ref = rmsnorm_ref(x, w, 1e-6)
    assert neon_ext.rmsnorm(x, w, 1e-6, out=x) is x
    assert_rel(x, ref, 1e-5)
    tiny = np.full((2, 9), 1e-6, np.float32)
    assert_rel(neon_ext.rmsnorm(tiny, w[:9], 1.0), rmsnorm_ref(tiny, w[:9], 1.0), 1e-5)


@pytest.mark.parametrize("d", SIZES + [576])
def test_fused_add_rmsnorm(path, d):
    x, r, w = randn(3, d, seed=d), randn(3, d, seed=d + 7), randn(d, seed=d + 9)
    s = x + r  # float32 addition, as the kernel does
    r_arg = r.copy()
    out, res = neon_ext.fused_add_rmsnorm(x, r_arg, w, 1e-5)
    assert res is r_arg
    np.testing.assert_array_equal(r_arg, s)
    assert_rel(out, rmsnorm_ref(s, w, 1e-5), 1e-5)
    # vLLM style: fully in place
    x2, r2 = x.copy(), r.copy()
    neon_ext.fused_add_rmsnorm(x2, r2, w, 1e-5, out=x2)
    np.testing.assert_array_equal(r2, s)
    np.testing.assert_array_equal(x2, out)


# ---------------------------------------------------------------- activations


def silu_mul_ref(x):
    d = x.shape[-1] // 2
    g, u = x[..., :d].astype(np.float64), x[..., d:].astype(np.float64)
    return g / (1.0 + np.exp(-g)) * u


def gelu_tanh_ref(x):
    # x * sigmoid(2u): the same function as 0.5 x (1 + tanh u), without cancellation for x << 0
    x = x.astype(np.float64)
    u = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)
    with np.errstate(over="ignore"):  # exp(+large) = inf gives the correct limit 0
        return x / (1.0 + np.exp(-2.0 * u))


EXTREMES = np.array([0.0, -0.0, 1e-20, -1e-20, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0], np.float32)


@pytest.mark.parametrize("d", SIZES + [1536])
def test_silu_and_mul(path, d):
    x = randn(3, 2 * d, seed=d, scale=4.0)
    x[0, : min(d, len(EXTREMES))] = EXTREMES[: min(d, len(EXTREMES))]
    assert_rel(neon_ext.silu_and_mul(x), silu_mul_ref(x), 1e-5, atol=1e-30)
    assert neon_ext.swiglu is neon_ext.silu_and_mul


@pytest.mark.parametrize("d", SIZES)
def test_gelu_tanh_and_mul(path, d):
    x = randn(2, 2 * d, seed=d, scale=3.0)
    x[0, : min(d, len(EXTREMES))] = EXTREMES[: min(d, len(EXTREMES))]
    ref = gelu_tanh_ref(x[..., :d]) * x[..., d:].astype(np.float64)
    assert_rel(neon_ext.gelu_and_mul(x), ref, 1e-5, atol=1e-30)


@pytest.mark.parametrize("n", SIZES)
def test_gelu_tanh(path, n):
    x = randn(n, seed=n, scale=3.0)
    x[: min(n, len(EXTREMES))] = EXTREMES[: min(n, len(EXTREMES))]
    assert_rel(neon_ext.gelu_tanh(x), gelu_tanh_ref(x), 1e-5, atol=1e-30)
    # the same function torch computes (its 1 + tanh form loses digits only far below zero)
    xs = randn(n, seed=n + 1, scale=2.0)
    ref = torch.nn.functional.gelu(torch.from_numpy(xs).double(), approximate="tanh").numpy()
    assert_rel(neon_ext.gelu_tanh(xs), ref, 1e-5, atol=1e-7)


def test_gelu_and_mul_only_tanh():
    with pytest.raises(ValueError, match="tanh"):
        neon_ext.gelu_and_mul(randn(2, 4), approximate="none")


# ---------------------------------------------------------------- RoPE


def cos_sin_cache(max_pos, rot, theta):
    """vLLM's RotaryEmbedding._compute_cos_sin_cache, in float32."""
    inv_freq = (1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot)))
    freqs = torch.einsum("i,j -> ij", torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).numpy()


def rope_ref(pos, x, head_size, rot, cache, is_neox):
    """vLLM's RotaryEmbedding.forward_static, float32 throughout."""
    t = x.shape[0]
    x = x.reshape(t, -1, head_size).copy()
    cos, sin = np.split(cache[pos], 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    r = x[..., :rot]
    x1, x2 = (r[..., : rot // 2], r[..., rot // 2:]) if is_neox else (r[..., ::2], r[..., 1::2])
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    x[..., :rot] = np.concatenate([o1, o2], -1) if is_neox else np.stack([o1, o2], -1).reshape(r.shape)
    return x.reshape(t, -1)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot", [(64, 64), (128, 128), (80, 32), (6, 6), (18, 10)])
@pytest.mark.parametrize("ntok", [1, 7, 65])
def test_rope_cache_bit_exact(path, is_neox, head_size, rot, ntok):
    nq, nk = 9, 3
    cache = cos_sin_cache(4096, rot, 10000.0)
    pos = rng(ntok).integers(0, 4096, ntok)
    qkv = randn(ntok, (nq + 2 * nk) * head_size, seed=head_size)  # q and k are strided views, as in vLLM
    q, k = qkv[:, : nq * head_size], qkv[:, nq * head_size:(nq + nk) * head_size]
    v_before = qkv[:, (nq + nk) * head_size:].copy()
    ref_q, ref_k = rope_ref(pos, q, head_size, rot, cache, is_neox), rope_ref(pos, k, head_size, rot, cache, is_neox)
    rq, rk = neon_ext.rope(pos, q, k, head_size=head_size, rotary_dim=rot, cos_sin_cache=cache, is_neox=is_neox)
    assert rq is q and rk is k
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(k, ref_k)
    np.testing.assert_array_equal(qkv[:, (nq + nk) * head_size:], v_before)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_from_theta(path, is_neox):
    head_size, theta = 64, 100000.0
    pos = np.array([0, 1, 2, 17, 255, 2047, 8191], dtype=np.int32)
    q = randn(len(pos), 3, head_size, seed=11)  # [tokens, heads, head_size] also accepted
    scale = np.abs(q).max()
    ref = rope_ref(pos, q.reshape(len(pos), -1), head_size, head_size, cos_sin_cache(8192, head_size, theta), is_neox)
    neon_ext.rope(torch.from_numpy(pos), q, None, head_size=head_size, theta=theta, is_neox=is_neox)
    assert_rel(q.reshape(len(pos), -1), ref, 0, atol=4e-6 * scale)


def test_rope_rejects_positions_outside_cache():
    cache = cos_sin_cache(16, 8, 10000.0)
    q = randn(2, 8)
    before = q.copy()
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        neon_ext.rope(np.array([3, 16]), q, head_size=8, cos_sin_cache=cache)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        neon_ext.rope(np.array([-1, 0]), q, head_size=8, cos_sin_cache=cache)
    np.testing.assert_array_equal(q, before)  # nothing written


def test_rope_rejects_bad_arguments():
    q = randn(2, 16)
    with pytest.raises(ValueError, match="rotary_dim"):
        neon_ext.rope(np.arange(2), q, head_size=8, rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        neon_ext.rope(np.arange(2), q, head_size=8, rotary_dim=10)
    with pytest.raises(ValueError, match="query"):
        neon_ext.rope(np.arange(3), q, head_size=8)
    with pytest.raises(ValueError, match="query"):
        neon_ext.rope(np.arange(2), q, head_size=5, rotary_dim=4)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        neon_ext.rope(np.arange(2), q, head_size=8, cos_sin_cache=randn(4, 6))
    with pytest.raises(TypeError, match="positions"):
        neon_ext.rope(np.arange(2, dtype=np.float32), q, head_size=8)
    with pytest.raises(ValueError, match="theta"):
        neon_ext.rope(np.arange(2), q, head_size=8, theta=-1.0)
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.rope(np.arange(2), q, q[:, 8:], head_size=8)


# ---------------------------------------------------------------- matmul


def check_matmul(a, b, got, trans_b=False):
    b = b.T if trans_b else b
    ref = a.astype(np.float64) @ b.astype(np.float64)
    bound = a.shape[1] * U32 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)) * 1.01 + 1e-30
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


MM_SHAPES = [(m, n, k) for m in (1, 3, 8, 9, 65) for n in (1, 7, 64, 65) for k in (1, 9, 63, 64)]
MM_SHAPES += [(300, 257, 520), (7, 2100, 33), (130, 17, 1000), (1, 4095, 65), (6, 16, 256), (8, 24, 4), (144, 2049, 3)]


@pytest.mark.parametrize("m,n,k", MM_SHAPES)
@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul(path, m, n, k, trans_b):
    a = randn(m, k, seed=m * 7 + k)
    b = randn(n, k, seed=n * 5 + k) if trans_b else randn(k, n, seed=n * 5 + k)
    check_matmul(a, b, neon_ext.matmul(a, b, trans_b=trans_b), trans_b)


@pytest.mark.parametrize("m", [2, 40])
@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_strided_views_and_out(path, m, trans_b):
    big_a, big_b, big_c = randn(m, 90, seed=1), randn(100, 120, seed=2), np.full((m, 80), 7.0, np.float32)
    a = big_a[:, 3:70]  # K = 67, lda = 90
    b = big_b[:50, 1:68] if trans_b else big_b[:67, 10:60]  # N = 50
    out = big_c[:, 5:55]
    assert neon_ext.matmul(a, b, trans_b=trans_b, out=out) is out
    check_matmul(a, b, out, trans_b)
    assert np.all(big_c[:, :5] == 7.0) and np.all(big_c[:, 55:] == 7.0)


def test_matmul_degenerate(path):
    np.testing.assert_array_equal(neon_ext.matmul(randn(3, 0), np.zeros((0, 5), np.float32)), np.zeros((3, 5)))
    assert neon_ext.matmul(np.zeros((0, 4), np.float32), randn(4, 5)).shape == (0, 5)
    assert neon_ext.matmul(randn(3, 4), np.zeros((4, 0), np.float32)).shape == (3, 0)


def test_matmul_rejects_bad_arguments():
    a, b = randn(4, 5), randn(5, 6)
    with pytest.raises(ValueError, match="b has shape"):
        neon_ext.matmul(a, randn(4, 6))
    with pytest.raises(ValueError, match="b has shape"):
        neon_ext.matmul(a, b, trans_b=True)
    with pytest.raises(ValueError, match="out has shape"):
        neon_ext.matmul(a, b, out=np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        neon_ext.matmul(randn(2, 4, 5), b)
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.matmul(a, randn(5, 5), out=a)
    with pytest.raises(ValueError, match="contiguous"):
        neon_ext.matmul(randn(5, 4).T, b)


# ---------------------------------------------------------------- FP8

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def torch_fp8_values(fmt):
    return torch.arange(256, dtype=torch.uint8).view(FORMATS[fmt]).float().numpy()


def torch_fp8_codes(v, fmt):
    """Reference quantiser: float32 RNE conversion by torch after saturating clamp."""
    m = neon_ext.FP8_MAX[fmt]
    clamped = np.where(np.isnan(v), v, np.clip(v, -m, m)).astype(np.float32)
    return torch.from_numpy(clamped).to(FORMATS[fmt]).view(torch.uint8).numpy()


def same_floats(a, b):
    return np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)].view(np.uint32), b[~np.isnan(b)].view(np.uint32))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 1024.0])
def test_fp8_dequantize_all_codes(path, fmt, scale):
    codes = np.tile(np.arange(256, dtype=np.uint8), 2)  # SIMD body and scalar tail
    got = neon_ext.fp8_dequantize(codes[:-3], scale=scale, fmt=fmt)
    ref = (np.tile(torch_fp8_values(fmt), 2)[:-3] * np.float32(scale)).astype(np.float32)
    assert same_floats(got, ref)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0])
def test_fp8_round_trip_all_codes(path, fmt, scale):
    codes = np.arange(256, dtype=np.uint8)
    values = neon_ext.fp8_dequantize(codes, scale=scale, fmt=fmt)
    back = neon_ext.fp8_quantize(values, scale=scale, fmt=fmt)
    finite, nan = np.isfinite(values), np.isnan(values)
    np.testing.assert_array_equal(back[finite], codes[finite])
    # every NaN code maps back to the canonical NaN with its sign
    np.testing.assert_array_equal(back[nan], (codes[nan] & 0x80) | 0x7F)
    # E5M2's S.11111.00 decodes to +-inf, which quantising saturates to the largest finite code
    inf = np.isinf(values)
    assert inf.sum() == (2 if fmt == "e5m2" else 0)
    np.testing.assert_array_equal(back[inf], (codes[inf] & 0x80) | 0x7B)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_quantize_matches_torch(path, fmt):
    m = neon_ext.FP8_MAX[fmt]
    r = rng(1)
    # every binade from far below the subnormals to far above the max, both signs
    x = (r.uniform(1, 2, 50_000) * 2.0 ** r.integers(-30, 20, 50_000) * r.choice([-1, 1], 50_000)).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, m, -m, m * 1.03, 1e38, 1e-45],
                                    np.float32)])
    for scale in (1.0, 0.02, 7.5):
        with np.errstate(over="ignore"):  # 1e38 / 0.02 overflows to inf, which saturates
            np.testing.assert_array_equal(neon_ext.fp8_quantize(x, scale=scale, fmt=fmt), torch_fp8_codes(x / np.float32(scale), fmt))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_ties_round_to_even(path, fmt):
    values = torch_fp8_values(fmt)[:128]
    finite = values[np.isfinite(values)]
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)  # exact in float32
    assert np.all(mids.astype(np.float64) == (finite[:-1].astype(np.float64) + finite[1:]) / 2)
    got = neon_ext.fp8_quantize(np.concatenate([mids, -mids]), fmt=fmt)
    np.testing.assert_array_equal(got & 1, 0)  # the even neighbour
    np.testing.assert_array_equal(got, torch_fp8_codes(np.concatenate([mids, -mids]), fmt))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_saturates(path, fmt):
    m = neon_ext.FP8_MAX[fmt]
    x = np.array([m, m * 1.01, m * 4, 3e38, np.inf, -np.inf, -m * 2], np.float32)
    got = neon_ext.fp8_dequantize(neon_ext.fp8_quantize(x, fmt=fmt), fmt=fmt)
    np.testing.assert_array_equal(got, [m, m, m, m, m, -m, -m])


def test_fp8_torch_tensors():
    x = torch.randn(4, 33)
    q = neon_ext.fp8_quantize(x, scale=0.5)
    assert q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(q.float(), (x / 0.5).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    back = neon_ext.fp8_dequantize(q, scale=0.5)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    q5 = neon_ext.fp8_quantize(x, fmt="e5m2")
    assert q5.dtype == torch.float8_e5m2
    with pytest.raises(ValueError, match="fmt"):
        neon_ext.fp8_quantize(x, fmt="e3m4")
    with pytest.raises(ValueError, match="scale"):
        neon_ext.fp8_quantize(x, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        neon_ext.fp8_quantize(x, scale=float("nan"))
    with pytest.raises(TypeError, match="uint8"):
        neon_ext.fp8_dequantize(np.zeros(4, np.int8))
    buf = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="overlaps"):  # uint8 codes written over the float input's tail
        neon_ext.fp8_quantize(buf[:16], out=buf.view(np.uint8)[60:76])


# ---------------------------------------------------------------- binding: torch, errors, threads


def test_torch_tensors_in_and_out(path):
    x = torch.randn(3, 130)
    w = torch.randn(130)
    y = neon_ext.rmsnorm(x, w, 1e-5)
    assert isinstance(y, torch.Tensor)
    out = torch.empty(3, 65)
    assert neon_ext.silu_and_mul(x, out=out) is out
    assert_rel(out.numpy(), silu_mul_ref(x.numpy()), 1e-5, atol=1e-30)
    xg = torch.randn(2, 8, requires_grad=True)
    assert_rel(neon_ext.softmax(xg).numpy(), softmax_ref(xg.detach().numpy()), 1e-6)


def test_wrong_dtype_is_type_error():
    for bad in (np.zeros((2, 4), np.float64), np.zeros((2, 4), np.float16), torch.zeros(2, 4, dtype=torch.bfloat16)):
        with pytest.raises(TypeError, match="float32"):
            neon_ext.softmax(bad)
    with pytest.raises(TypeError, match="ndarray"):
        neon_ext.exp([1.0, 2.0])
    with pytest.raises(TypeError, match="float32"):
        neon_ext.rmsnorm(randn(2, 4), np.ones(4))
    with pytest.raises(TypeError, match="float32"):
        neon_ext.exp(randn(4), out=np.empty(4, np.float64))
    with pytest.raises(TypeError, match="positional"):
        neon_ext._kernels.exp(randn(4))
    with pytest.raises(TypeError, match="ndarray"):
        neon_ext._kernels.exp(object(), object())


def test_wrong_shape_or_layout_is_value_error():
    x = randn(4, 6)
    with pytest.raises(ValueError, match="weight"):
        neon_ext.rmsnorm(x, randn(5))
    with pytest.raises(ValueError, match="out has shape"):
        neon_ext.rmsnorm(x, randn(6), out=np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="even"):
        neon_ext.silu_and_mul(randn(2, 5))
    with pytest.raises(ValueError, match="out has shape"):
        neon_ext.silu_and_mul(x, out=np.empty((4, 6), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        neon_ext.softmax(randn(6, 4).T)
    with pytest.raises(ValueError, match="contiguous"):
        neon_ext.exp(randn(4, 6)[:, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        neon_ext.rmsnorm(torch.randn(6, 4).t(), torch.randn(6))
    with pytest.raises(ValueError, match="at least 1"):
        neon_ext.softmax(np.ones((), np.float32))
    with pytest.raises(ValueError, match="eps"):
        neon_ext.rmsnorm(x, randn(6), eps=-1.0)
    with pytest.raises(ValueError, match="residual"):
        neon_ext.fused_add_rmsnorm(x, randn(4, 5), randn(6))


def test_unsafe_outputs_are_value_errors():
    x = randn(4, 6)
    ro = randn(4, 6)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        neon_ext.softmax(x, out=ro)
    with pytest.raises(ValueError, match="writable"):
        neon_ext.fused_add_rmsnorm(x, ro, randn(6))
    raw = bytearray(4 * 7)
    misaligned = np.ndarray((6,), np.float32, buffer=raw, offset=1)
    with pytest.raises(ValueError, match="aligned"):
        neon_ext.exp(misaligned)
    big = randn(4, 12)
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.silu_and_mul(big, out=big[:, :6])
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.softmax(big[:, :6], out=big[:, 3:9])
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.fused_add_rmsnorm(big[:, :6], big[:, 3:9], randn(6))
    broadcast = np.broadcast_to(np.zeros(6, np.float32), (4, 6))
    with pytest.raises(ValueError):
        neon_ext.softmax(x, out=broadcast)


def test_empty_inputs(path):
    assert neon_ext.softmax(np.zeros((0, 5), np.float32)).shape == (0, 5)
    assert neon_ext.softmax(np.zeros((3, 0), np.float32)).shape == (3, 0)
    assert neon_ext.rmsnorm(np.zeros((0, 5), np.float32), randn(5)).shape == (0, 5)
    assert neon_ext.silu_and_mul(np.zeros((0, 8), np.float32)).shape == (0, 4)
    assert neon_ext.exp(np.zeros(0, np.float32)).shape == (0,)
    assert neon_ext.fp8_quantize(np.zeros(0, np.float32)).shape == (0,)
    q = np.zeros((0, 8), np.float32)
    neon_ext.rope(np.zeros(0, np.int64), q, head_size=8)


def test_threads_run_concurrently_and_correctly(path):
    """Kernels release the GIL on large inputs; results stay correct with several threads."""
    xs = [randn(64, 4096, seed=s) for s in range(4)]
    refs = [softmax_ref(x) for x in xs]
    results = [None] * 4

    def work(i):
        for _ in range(3):
            results[i] = neon_ext.softmax(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, refs):
        assert_rel(got, ref, 1e-6)
