"""neon_ext.vllm_ops: our kernels as vLLM out-of-tree custom ops, compared layer by layer with vLLM's
own native forward on random tensors.  No engine is started: the layers are built directly inside a
default VllmConfig context, as vLLM's own op tests do."""
from __future__ import annotations

import pytest
import torch

vllm_ops = pytest.importorskip("neon_ext.vllm_ops", reason="vLLM is not installed")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers import rotary_embedding as rope_module  # noqa: E402
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from vllm.model_executor.layers.layernorm import RMSNorm  # noqa: E402

NAMES = ["RMSNorm", "SiluAndMul", "GeluAndMul", "RotaryEmbedding"]


@pytest.fixture
def ops():
    """Registered ops inside a vLLM config context; undone afterwards so other tests see stock vLLM."""
    names = vllm_ops.register()
    with set_current_vllm_config(VllmConfig()), torch.inference_mode():
        yield names
    vllm_ops.unregister()


def get_rope(head_size, rotary_dim=None, is_neox=True, max_position=4096, theta=100000.0):
    rope_module._ROPE_DICT.clear()  # get_rope caches instances across tests
    params = {"rope_theta": theta, "rope_type": "default"}
    if rotary_dim is not None:
        params["partial_rotary_factor"] = rotary_dim / head_size
    return rope_module.get_rope(head_size, max_position=max_position, rope_parameters=params, is_neox_style=is_neox)


def test_register_replaces_the_four_layers(ops):
    assert ops == NAMES
    assert vllm_ops.register() == NAMES  # idempotent
    status = vllm_ops.status()
    assert status["neon_kernels"] and status["ops"] == NAMES and status["path"]
    layers = [RMSNorm(64), SiluAndMul(), GeluAndMul(approximate="tanh"), get_rope(64)]
    for layer, cls in zip(layers, (vllm_ops.NeonRMSNorm, vllm_ops.NeonSiluAndMul, vllm_ops.NeonGeluAndMul,
                                   vllm_ops.NeonRotaryEmbedding)):
        assert type(layer) is cls
        assert layer._forward_method == layer.forward_cpu  # what the CPU platform dispatches to


def test_the_plugin_registers_only_where_the_host_asks(monkeypatch):
    from neon_ext import vllm_plugin
    monkeypatch.delenv("NEON_EXT_VLLM_OPS", raising=False)
    vllm_plugin.register()
    assert vllm_ops.status()["ops"] == []
    monkeypatch.setenv("NEON_EXT_VLLM_OPS", "1")
    vllm_plugin.register()
    assert vllm_ops.status()["ops"] == NAMES
    vllm_ops.unregister()


def test_unregister_restores_vllm():
    vllm_ops.register()
    vllm_ops.unregister()
    with set_current_vllm_config(VllmConfig()):
        assert type(RMSNorm(64)) is RMSNorm
    assert vllm_ops.status()["ops"] == []


@pytest.mark.parametrize("hidden,tokens", [(576, 1), (576, 7), (2048, 33), (65, 3)])
def test_rmsnorm_matches_native(ops, hidden, tokens):
    layer = RMSNorm(hidden, eps=1e-5)
    layer.weight.data.normal_()
    x, r = torch.randn(tokens, hidden) * 3, torch.randn(tokens, hidden)
    torch.testing.assert_close(layer(x.clone()), layer.forward_native(x.clone()), rtol=1e-5, atol=1e-6)
    out, res = layer(x.clone(), r.clone())
    ref_out, ref_res = layer.forward_native(x.clone(), r.clone())
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3072), (7, 130), (2, 3, 64)])
def test_silu_and_mul_matches_native(ops, shape):
    layer = SiluAndMul()
    x = torch.randn(shape) * 4
    torch.testing.assert_close(layer(x), layer.forward_native(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_and_mul_matches_native(ops, approximate):
    layer = GeluAndMul(approximate=approximate)
    # Seeded: for large negative gate values the native tanh form cancels 1 + tanh(u) to 0
    # while neon_ext returns the correctly signed tiny product (~1e-6), which an unseeded
    # input hit in about 5 % of runs (relative error inf, absolute just above atol).
    x = torch.randn(9, 2 * 257, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(layer(x), layer.forward_native(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, None), (128, None), (64, 32)])
@pytest.mark.parametrize("tokens", [1, 17])
def test_rotary_embedding_matches_native(ops, is_neox, head_size, rotary_dim, tokens):
    rope = get_rope(head_size, rotary_dim, is_neox)
    nq, nkv = 9, 3
    positions = torch.randint(0, 4096, (tokens,))
    qkv = torch.randn(tokens, (nq + 2 * nkv) * head_size)
    q, k, _ = qkv.split([nq * head_size, nkv * head_size, nkv * head_size], dim=-1)  # strided views, as in Llama
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr()  # in place, like vLLM's CPU kernel
    torch.testing.assert_close(out_q.reshape(tokens, -1), ref_q.reshape(tokens, -1), rtol=0, atol=0)
    torch.testing.assert_close(out_k.reshape(tokens, -1), ref_k.reshape(tokens, -1), rtol=0, atol=0)
    q3 = torch.randn(tokens, nq, head_size)  # [tokens, heads, head_size] and no key
    ref3, _ = rope.forward_native(positions, q3.clone(), None)
    out3, none = rope(positions, q3, None)
    assert none is None
    torch.testing.assert_close(out3, ref3.reshape(out3.shape), rtol=0, atol=0)


def test_other_dtypes_fall_back_to_vllm(ops):
    norm, act = RMSNorm(64), SiluAndMul()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), norm.forward_native(x), rtol=0, atol=0)
    torch.testing.assert_close(act(x), act.forward_native(x), rtol=0, atol=0)
    rope = get_rope(16)
    q = torch.randn(2, 32, dtype=torch.bfloat16)
    pos = torch.arange(2)
    ref, _ = rope.forward_native(pos, q.clone(), None)
    out, _ = rope(pos, q, None)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)  # vLLM's own C kernel vs its native path


def test_traceable_by_torch_compile(ops):
    """Under torch.compile (production configs) the ops appear as torch custom ops in the graph."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2, self.act = RMSNorm(64, eps=1e-5), RMSNorm(64, eps=1e-5), SiluAndMul()
            self.gelu = GeluAndMul(approximate="tanh")
            self.rope = get_rope(16, max_position=128)

        def forward(self, pos, x, res):
            h, res = self.n1(x, res)
            q, k = torch.cat([h, h[:, :32]], -1).split([64, 32], -1)
            q, k = self.rope(pos, q, k)
            y = self.act(torch.cat([q, q], -1)) + self.gelu(torch.cat([q, q], -1))
            return self.n2(y) + k.sum(), res

    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    block = Block()
    pos, x, r = torch.arange(5), torch.randn(5, 64), torch.randn(5, 64)
    ref = block(pos, x.clone(), r.clone())
    out = torch.compile(block, fullgraph=True, backend=backend)(pos, x.clone(), r.clone())
    ops_in_graph = {t for t in seen if "neon_ext" in t}
    assert {"neon_ext.fused_add_rms_norm.default", "neon_ext.rms_norm.default", "neon_ext.silu_and_mul.default",
            "neon_ext.gelu_tanh_and_mul.default", "neon_ext.rotary_embedding.default"} <= ops_in_graph, seen
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
