"""vLLM general plugin (entry point group ``vllm.general_plugins``): our kernels inside a runner.

vLLM calls `register` in each of its processes. It replaces the layers with neon_ext's custom ops only where the
model host asked for them (``NEON_EXT_VLLM_OPS=1`` in the runner's environment, from the expert's
``engine.neon_kernels``), so every other vLLM server on the machine is left as it is.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("vllm.neon_ext")  # vLLM configures its own loggers only: this line reaches the runner log
ENV = "NEON_EXT_VLLM_OPS"


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    from neon_ext import get_path, vllm_ops
    ops = vllm_ops.register()
    log.info("neon_ext: replaced %s with our kernels (%s path)", ", ".join(ops), get_path())
