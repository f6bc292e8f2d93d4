"""A vLLM plugin, in runners with engine.fast_sampler: top-k/top-p sampling on CPU without sorting the vocabulary.

vLLM 0.32's CPU sampler sorts every row whenever `top_p` is set, and then draws over the whole vocabulary; that
cost 40 % of the throughput at 8 streams here. This draws with vLLM's own Gumbel-max kernel over each row's nucleus
(`core.host.top_k_top_p`), the same distribution, and masks with the same selection where vLLM returns processed
logits. It checks the vLLM version and the names it replaces; tests/test_sampling.py fails if they change.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from core.host.patch_switches import FAST_SAMPLER as ENV  # set by the host (engine.fast_sampler)
from core.host.top_k_top_p import apply_top_k_top_p, nuclei

VLLM_VERSION = "0.32.0"
log = logging.getLogger(__name__)


def apply() -> bool:
    """Replace the CPU sampler's filter and draw; False (and a warning) if vLLM is not the version checked."""
    import vllm
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    sampler = ops.TopKTopPSampler
    if vllm.__version__ != VLLM_VERSION or not hasattr(ops, "apply_top_k_top_p") or not hasattr(sampler,
                                                                                                 "forward_cpu"):
        log.warning("fast sampler not applied: written for vLLM %s, found %s", VLLM_VERSION, vllm.__version__)
        return False
    if not getattr(sampler.forward_cpu, "fast_sampler", False):
        ops.apply_top_k_top_p = apply_top_k_top_p  # what forward_cpu and forward_native call to mask
        sampler.forward_cpu = _nucleus_forward(sampler.forward_cpu, ops.PROCESSED_LOGPROBS_MODES)
    return True


def _nucleus_forward(vllm_forward, processed_modes):
    """TopKTopPSampler.forward_cpu drawing over the nucleus; vLLM's own where it must return processed logits."""

    @functools.wraps(vllm_forward)
    def forward_cpu(self, logits: torch.Tensor, generators: dict[int, torch.Generator],
                    k: torch.Tensor | None, p: torch.Tensor | None):
        if (k is None and p is None) or self.use_fp64_gumbel or self.logprobs_mode in processed_modes:
            return vllm_forward(self, logits, generators, k, p)
        seeds = draw_seeds(logits.shape[0], generators)
        sampled = torch.empty(logits.shape[0], dtype=torch.long)
        for nucleus in nuclei(logits, k, p):
            choice = torch.ops._C.fused_gumbel_argmax(nucleus.logits.float().contiguous(), seeds[nucleus.rows])
            sampled[nucleus.rows] = nucleus.tokens.gather(1, choice.view(-1, 1).long()).view(-1)
        return sampled, None

    forward_cpu.fast_sampler = True
    return forward_cpu


def draw_seeds(rows: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One Gumbel seed per row, as vLLM draws them: from a request's own generator where it set `seed`."""
    seeds = torch.randint(0, 2**31, (rows,), dtype=torch.long)
    for row, generator in generators.items():
        seeds[row] = int(torch.randint(0, 2**31, (1,), generator=generator, dtype=torch.long))
    return seeds


def register() -> None:
    """The vLLM plugin entry point."""
    if os.environ.get(ENV) == "1":
        apply()
        log.info("fast sampler: top-k/top-p draw over the nucleus (core.host.fast_sampler)")
