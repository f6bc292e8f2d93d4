"""neon_ext._torch, the direct binding for torch tensors.

It must give exactly what the general (NumPy-view) binding gives, since both call the same
kernels on the same path, and hand everything it does not take back to the general path, which
then computes it or raises the general path's error.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import neon_ext

PATHS = neon_ext.info()["supported_paths"]


@pytest.fixture(params=PATHS)
def path(request):
    previous = neon_ext.get_path()
    neon_ext.set_path(request.param)
    yield request.param
    neon_ext.set_path(previous)


@pytest.fixture(scope="module")
def fast():
    neon_ext.softmax(torch.zeros(1, 2))  # the first torch tensor loads the binding
    assert neon_ext.info()["torch_binding"] is True, "neon_ext._torch is not built: run neon_ext/build.py"
    return neon_ext._fast


def same(a: torch.Tensor, b) -> bool:
    b = torch.from_numpy(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_binding_takes_plain_tensors(fast):
    x = torch.randn(3, 64)
    assert isinstance(fast.softmax(x, 1.0, False), torch.Tensor)
    assert isinstance(fast.rmsnorm(x, torch.ones(64), 1e-6), torch.Tensor)
    assert isinstance(fast.silu_and_mul(x), torch.Tensor)
    assert isinstance(fast.gelu_tanh_and_mul(x), torch.Tensor)


@pytest.mark.parametrize("shape", [(1, 576), (5, 9), (2, 3, 65), (4095,)])
def test_same_results_as_the_numpy_binding(fast, path, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    xn, wn = x.numpy().copy(), w.numpy().copy()
    assert same(neon_ext.softmax(x, scale=0.7), neon_ext.softmax(xn, scale=0.7))
    assert same(neon_ext.softmax(x, causal=True), neon_ext.softmax(xn, causal=True))
    assert same(neon_ext.rmsnorm(x, w, 1e-5), neon_ext.rmsnorm(xn, wn, 1e-5))
    if shape[-1] % 2 == 0:
        assert same(neon_ext.silu_and_mul(x), neon_ext.silu_and_mul(xn))
        assert same(neon_ext.gelu_and_mul(x), neon_ext.gelu_and_mul(xn))
    # fused: residual += x, then the norm, both in place (out=x) and into a new tensor
    r, rn = torch.randn(*shape, generator=g), None
    rn = r.numpy().copy()
    expect_out, _ = neon_ext.fused_add_rmsnorm(xn.copy(), rn, wn, 1e-5)
    r2 = r.clone()
    got, res = neon_ext.fused_add_rmsnorm(x.clone(), r2, w, 1e-5)
    assert res is r2 and same(got, expect_out) and same(r2, rn)
    xi, r3 = x.clone(), r.clone()
    got, _ = neon_ext.fused_add_rmsnorm(xi, r3, w, 1e-5, out=xi)
    assert got is xi and same(xi, expect_out) and same(r3, rn)


def test_the_active_path_is_shared_with_the_numpy_binding(fast):
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1)) * 10
    results = {}
    for p in PATHS:
        neon_ext.set_path(p)
        try:
            results[p] = fast.softmax(x, 1.0, False)
            assert same(results[p], neon_ext.softmax(x.numpy()))
        finally:
            neon_ext.set_path(neon_ext.info()["best_path"])
    if len(results) > 1:  # the SIMD and scalar exp round differently somewhere in 8000 values
        assert not torch.equal(*list(results.values())[:2])


def test_rope_on_qkv_slices_in_place(fast, path):
    tokens, head, nq, nkv = 5, 64, 3, 1
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (nq + 2 * nkv) * head, generator=g)
    q, k = qkv[:, : nq * head], qkv[:, nq * head: (nq + nkv) * head]
    pos = torch.tensor([0, 7, 3, 100, 4095])
    inv = 1.0 / (10000.0 ** (torch.arange(0, head, 2, dtype=torch.float) / head))
    freqs = torch.outer(torch.arange(4096, dtype=torch.float), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    expect = qkv.numpy().copy()
    neon_ext.rope(pos.numpy(), expect[:, : nq * head], expect[:, nq * head: (nq + nkv) * head], head_size=head,
                  cos_sin_cache=cache.numpy())
    assert fast.rope(pos, q, k, head, head, True, cache) is True
    assert same(qkv, expect)


def test_what_it_does_not_take_goes_to_the_general_path(fast):
    x = torch.randn(4, 6)
    assert fast.softmax(x.t(), 1.0, False) is None  # last dimension not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        neon_ext.softmax(x.t())
    xg = torch.randn(2, 8, requires_grad=True)
    assert fast.softmax(xg, 1.0, False) is None
    assert same(neon_ext.softmax(xg), neon_ext.softmax(xg.detach().numpy()))
    assert fast.softmax(x.double(), 1.0, False) is None
    with pytest.raises(TypeError, match="float32"):
        neon_ext.softmax(x.double())
    assert fast.rmsnorm(x, torch.ones(5), 1e-6) is None
    with pytest.raises(ValueError, match="weight"):
        neon_ext.rmsnorm(x, torch.ones(5))
    assert fast.rmsnorm(x, torch.ones(6), -1.0) is None
    with pytest.raises(ValueError, match="eps"):
        neon_ext.rmsnorm(x, torch.ones(6), eps=-1.0)
    assert fast.silu_and_mul(torch.randn(3, 5)) is None
    with pytest.raises(ValueError, match="even"):
        neon_ext.silu_and_mul(torch.randn(3, 5))
    param = torch.nn.Parameter(torch.randn(2, 4), requires_grad=False)
    assert same(neon_ext.softmax(param), neon_ext.softmax(param.detach().numpy()))
    assert neon_ext.softmax(torch.zeros(0, 5)).shape == (0, 5)


def test_overlapping_and_out_of_range_rope_is_refused_untouched(fast):
    head = 8
    cache = torch.randn(16, head)
    qkv = torch.randn(2, 4 * head)
    before = qkv.clone()
    q, k = qkv[:, : 2 * head], qkv[:, head: 3 * head]  # k overlaps q
    assert fast.rope(torch.tensor([0, 1]), q, k, head, head, True, cache) is None
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.rope(torch.tensor([0, 1]), q, k, head_size=head, cos_sin_cache=cache)
    q, k = qkv[:, :head], qkv[:, head: 2 * head]
    assert fast.rope(torch.tensor([0, 16]), q, k, head, head, True, cache) is None  # position 16 of 16
    with pytest.raises(ValueError):
        neon_ext.rope(torch.tensor([0, 16]), q, k, head_size=head, cos_sin_cache=cache)
    assert torch.equal(qkv, before)


def test_overlapping_fused_operands_are_refused(fast):
    buf = torch.randn(4, 8)
    x, residual = buf[:, :6], buf[:, 2:]  # share columns 2..5
    assert fast.fused_add_rmsnorm(x, residual, torch.ones(6), 1e-6, True) is None
    with pytest.raises(ValueError, match="overlaps"):
        neon_ext.fused_add_rmsnorm(x, residual, torch.ones(6), out=x)


def test_bad_argument_counts_raise(fast):
    with pytest.raises(TypeError, match="positional"):
        fast.softmax(torch.zeros(2))


def test_threads_share_the_binding(fast):
    """Large inputs run without the GIL; results stay exact with several threads."""
    xs = [torch.randn(64, 4096, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expect = [neon_ext.softmax(x.numpy()) for x in xs]
    results = [None] * 4

    def work(i):
        for _ in range(3):
            results[i] = neon_ext.softmax(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(same(got, want) for got, want in zip(results, expect))
