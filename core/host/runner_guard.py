"""No runner process outlives its owner: each dies with its parent, all the way down from the model host.

The host starts a runner with plain `start_new_session` (no code runs between fork and exec) and its own pid in
`PARENT_ENV`. `register`, a vLLM general plugin run early in each of vLLM's processes, sets the parent-death
signal there and exits at once if the parent named in the environment is already gone; it then names itself as
the parent of the processes it will start (the engine core, its worker). A forked child runs no plugin (vLLM
loads them once per interpreter), so the same is done for it at fork.
"""
from __future__ import annotations

import ctypes
import os
import signal

RUNNER_ENV = "CAPIBARA_RUNNER_LOG"  # set by the host in a runner's environment
PARENT_ENV = "CAPIBARA_RUNNER_PARENT"  # the pid this process must die with
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies; exit at once if `parent` is no longer its parent."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def register() -> None:
    """The vLLM plugin entry point: in a runner's processes only, once per process."""
    if RUNNER_ENV not in os.environ or os.environ.get(PARENT_ENV) == str(os.getpid()):
        return
    die_with_parent(int(os.environ.get(PARENT_ENV) or os.getppid()))
    os.environ[PARENT_ENV] = str(os.getpid())
    os.register_at_fork(after_in_child=_guard_forked_child)


def _guard_forked_child() -> None:
    parent = int(os.environ[PARENT_ENV])
    die_with_parent(parent)
    os.environ[PARENT_ENV] = str(os.getpid())
