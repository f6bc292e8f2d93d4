"""vLLM general plugin (entry point group ``vllm.general_plugins``): our kernels inside a runner.

vLLM calls `register` once in each interpreter (a forked engine core inherits the API server's ops). It replaces the layers with neon_ext's custom ops only where the
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
    from neon_ext import vllm_ops
    vllm_ops.register()
    _announce()
    os.register_at_fork(after_in_child=_announce)


def _announce() -> None:
    """One line in the runner's log, from the process that runs the model. vLLM configures its loggers only after
    the API server has loaded the plugins, so there the line waits for the engine core's fork."""
    if log.hasHandlers():
        from neon_ext import get_path, vllm_ops
        log.info("neon_ext: replaced %s with our kernels (%s path)", ", ".join(vllm_ops.status()["ops"]),
                 get_path())
