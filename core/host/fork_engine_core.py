"""A vLLM plugin, in runners with engine.fork_engine_core: the engine-core process forked, not spawned.

vLLM 0.32's CPU platform forces multiprocessing's `spawn`, so the engine core imports vLLM and torch all over again
after the API server has: 10-13 s of every runner start here. vLLM's default elsewhere is `fork`, which inherits
those imports; decoding measured the same (docs/performance.md). One narrow patch puts `fork` back after the
platform's config check; it checks the vLLM version it was written for, and tests/test_runner_phases.py fails
if it stops applying.
"""
from __future__ import annotations

import logging
import os

from core.host.patch_switches import FORK_ENGINE_CORE as ENV  # set by the host (engine.fork_engine_core)

VLLM_VERSION = "0.32.0"
log = logging.getLogger(__name__)


def apply() -> bool:
    """Make the CPU platform choose `fork`; False (and a warning) if vLLM is not the version checked."""
    import vllm
    from vllm.platforms.cpu import CpuPlatform

    if vllm.__version__ != VLLM_VERSION:
        log.warning("engine core fork not applied: written for vLLM %s, found %s", VLLM_VERSION, vllm.__version__)
        return False
    check = CpuPlatform.check_and_update_config.__func__
    if getattr(check, "forks_engine_core", False):
        return True

    def check_and_update_config(cls, vllm_config) -> None:
        check(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    check_and_update_config.forks_engine_core = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    return True


def register() -> None:
    """The vLLM plugin entry point."""
    if os.environ.get(ENV) == "1":
        apply()
