"""No runner process outlives its owner: each dies with its parent, all the way down from the model host.

The host sets this up in the runner's first process before exec (`die_with_parent`). vLLM then spawns an
engine-core process, which spawns a worker; neither inherits a parent-death signal, so `register` (a vLLM general
plugin, run in each of vLLM's processes) sets it in them too when they belong to a runner.
"""
from __future__ import annotations

import ctypes
import os
import signal

RUNNER_ENV = "CAPIBARA_RUNNER_LOG"  # set by the host in a runner's environment
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies; exit at once if the parent is already gone."""
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def register() -> None:
    """The vLLM plugin entry point: in a runner's processes only."""
    if RUNNER_ENV in os.environ:
        die_with_parent()
