"""neon_ext kernels as vLLM out-of-tree custom ops.

``register()`` (call it in the engine process before the engine builds its model) makes vLLM
instantiate our subclasses wherever a model asks for ``RMSNorm``, ``SiluAndMul``, ``GeluAndMul``
or ``RotaryEmbedding`` (``CustomOp.register_oot`` matches the in-tree class name).  On the CPU
platform vLLM dispatches an enabled custom op to ``forward_cpu``; that is what we override.  The
subclasses report themselves enabled whatever ``compilation_config.custom_ops`` says: registering
them is the opt-in (the per-expert ``engine.neon_kernels`` switch).

Each override handles the float32 case our kernels cover (last dimension contiguous, and the
op's variant we implement) and hands everything else to vLLM's own implementation, so enabling the
ops never changes which inputs work.  In eager mode the kernels are called directly through the
public API, whose torch binding keeps the cost per call well under vLLM's own ops at decode
sizes; under torch.compile the same work goes through torch custom ops (``torch.ops.neon_ext.*``)
with fake implementations, so Dynamo can trace the model.
"""

from __future__ import annotations


import torch
from vllm.model_executor.custom_op import CustomOp, op_registry_oot
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

import neon_ext
from neon_ext import _kernels

_registered: list[str] = []

# ---- torch custom ops: the traceable form of each kernel -------------------------------


@torch.library.custom_op("neon_ext::rms_norm", mutates_args=("out",))
def rms_norm_op(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _kernels.rmsnorm(x.numpy(), weight.numpy(), out.numpy(), eps)


@rms_norm_op.register_fake
def _(out, x, weight, eps):
    return None


@torch.library.custom_op("neon_ext::fused_add_rms_norm", mutates_args=("x", "residual"))
def fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    xa = x.numpy()
    _kernels.fused_add_rmsnorm(xa, residual.numpy(), weight.numpy(), xa, eps)


@fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return None


@torch.library.custom_op("neon_ext::silu_and_mul", mutates_args=("out",))
def silu_and_mul_op(out: torch.Tensor, x: torch.Tensor) -> None:
    _kernels.silu_and_mul(x.numpy(), out.numpy())


@silu_and_mul_op.register_fake
def _(out, x):
    return None


@torch.library.custom_op("neon_ext::gelu_tanh_and_mul", mutates_args=("out",))
def gelu_tanh_and_mul_op(out: torch.Tensor, x: torch.Tensor) -> None:
    _kernels.gelu_tanh_and_mul(x.numpy(), out.numpy())


@gelu_tanh_and_mul_op.register_fake
def _(out, x):
    return None


@torch.library.custom_op("neon_ext::rotary_embedding", mutates_args=("query", "key"))
def rotary_embedding_op(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
                        rotary_dim: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    _kernels.rope(positions.numpy(), query.numpy(), None if key is None else key.numpy(), head_size, rotary_dim,
                  is_neox, cos_sin_cache.numpy(), 0.0)


@rotary_embedding_op.register_fake
def _(positions, query, key, head_size, rotary_dim, cos_sin_cache, is_neox):
    return None


def _rows_ok(t: torch.Tensor) -> bool:
    """float32 CPU tensor our row kernels take without a copy."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() >= 1 and t.stride(-1) == 1
            and (t.dim() <= 2 or t.is_contiguous()))


def _eager() -> bool:
    return not torch.compiler.is_compiling()


# ---- the vLLM layer subclasses ------------------------------------------------------------


class NeonRMSNorm(RMSNorm):
    @classmethod
    def enabled(cls) -> bool:
        return True

    def forward_cpu(self, x, residual=None):
        w = self.weight.data
        if (self.variance_size_override is not None or not _rows_ok(x) or w.dtype != torch.float32
                or (residual is not None and (not _rows_ok(residual) or residual.shape != x.shape))):
            return self.forward_native(x, residual)
        if residual is None:
            if _eager():
                return neon_ext.rmsnorm(x, w, self.variance_epsilon)
            out = torch.empty(x.shape, dtype=x.dtype)
            rms_norm_op(out, x, w, self.variance_epsilon)
            return out
        # vLLM's fused variant works in place: residual <- x + residual, x <- norm(residual)
        if _eager():
            return neon_ext.fused_add_rmsnorm(x, residual, w, self.variance_epsilon, out=x)
        fused_add_rms_norm_op(x, residual, w, self.variance_epsilon)
        return x, residual


class NeonSiluAndMul(SiluAndMul):
    @classmethod
    def enabled(cls) -> bool:
        return True

    def forward_cpu(self, x):
        if not _rows_ok(x) or x.shape[-1] % 2:
            return super().forward_cpu(x)
        if _eager():
            return neon_ext.silu_and_mul(x)
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype)
        silu_and_mul_op(out, x)
        return out


class NeonGeluAndMul(GeluAndMul):
    @classmethod
    def enabled(cls) -> bool:
        return True

    def forward_cpu(self, x):
        # our kernel is the tanh approximation; exact (erf) GeLU stays with vLLM
        if self.approximate != "tanh" or not _rows_ok(x) or x.shape[-1] % 2:
            return super().forward_cpu(x)
        if _eager():
            return neon_ext.gelu_and_mul(x)
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype)
        gelu_tanh_and_mul_op(out, x)
        return out


class NeonRotaryEmbedding(RotaryEmbedding):
    @classmethod
    def enabled(cls) -> bool:
        return True

    def forward_cpu(self, positions, query, key=None):
        cache = self._match_cos_sin_cache_dtype(query)
        if (query.dtype != torch.float32 or query.stride(-1) != 1 or query.dim() not in (2, 3)
                or (key is not None and (key.dtype != torch.float32 or key.stride(-1) != 1 or key.dim() not in (2, 3)))
                or positions.dtype != torch.int64 or not cache.is_contiguous()):
            return super().forward_cpu(positions, query, key)
        pos = positions.reshape(-1).contiguous()
        if _eager():
            return neon_ext.rope(pos, query, key, head_size=self.head_size, rotary_dim=self.rotary_dim,
                                 cos_sin_cache=cache, is_neox=self.is_neox_style)
        rotary_embedding_op(pos, query, key, self.head_size, self.rotary_dim, cache, self.is_neox_style)
        return query, key


OPS = {"RMSNorm": NeonRMSNorm, "SiluAndMul": NeonSiluAndMul, "GeluAndMul": NeonGeluAndMul,
       "RotaryEmbedding": NeonRotaryEmbedding}


def register() -> list[str]:
    """Register the ops with vLLM (once per process) and return the in-tree class names replaced."""
    if not _registered:
        for name, cls in OPS.items():
            if name in op_registry_oot:  # another plugin replaced this layer already
                continue
            CustomOp.register_oot(cls, name=name)
            _registered.append(name)
    return list(_registered)


def unregister() -> None:
    """Undo register(): layers built afterwards are vLLM's own again."""
    for name in _registered:
        if op_registry_oot.get(name) is OPS[name]:
            del op_registry_oot[name]
    _registered.clear()


def status() -> dict:
    """What to report (e.g. in /v1/models and /stats): the ops in use and the kernel path."""
    return {"neon_kernels": bool(_registered), "ops": list(_registered), "path": neon_ext.get_path()}
