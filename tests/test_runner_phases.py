"""A runner start split into phases by vLLM's own log lines, and the engine-core fork patch on the installed vLLM.

The phases of a real start (and that the fork shortens it) are checked on real runners in test_model_host.py.
"""
from __future__ import annotations

import os
import time

from core.host import fork_engine_core
from core.host.runner_phases import PHASES, StartPhases

LINES = {  # the end of each phase, as vLLM 0.32 prints it
    "imports": b"(APIServer pid=1) INFO 12-05 09:20:18 [api_utils.py:286] non-default args: {'uds': '/x'}\n",
    "engine_process": b"(EngineCore pid=2) INFO 12-05 09:20:28 [core.py:133] Initializing a V1 LLM engine (v0.32.0)\n",
    "weights": b"(EngineCore pid=2) INFO 12-05 09:20:30 [default_loader.py:501] Loading weights took 0.28 seconds\n",
    "compile": b"(EngineCore pid=2) INFO 12-05 09:20:46 [core.py:402] init engine (profile, create kv cache, "
               b"warmup model) took 15.24 s\n",
}


def test_each_marker_ends_its_phase_when_it_arrives(monkeypatch):
    clock = iter([1.0, 3.0, 3.5, 7.0, 7.25])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    phases = StartPhases(started=0.0)
    for name in ("imports", "engine_process", "weights", "compile"):
        phases.feed(b"noise before\n" + LINES[name])
    phases.ready()
    assert phases.durations() == {"imports": 1.0, "engine_process": 2.0, "weights": 0.5, "compile": 3.5,
                                  "serving": 0.25}
    assert phases.summary() == ("imports 1.0 s, engine_process 2.0 s, weights 0.5 s, compile 3.5 s, "
                                "serving 0.2 s")
    assert list(phases.durations()) == list(PHASES)


def test_a_line_split_between_reads_is_seen_once_whole(monkeypatch):
    clock = iter([5.0, 6.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    phases = StartPhases(started=0.0)
    line = LINES["imports"]
    phases.feed(line[:30])
    phases.feed(line[30:])
    assert phases.durations()["imports"] == 6.0


def test_a_phase_whose_marker_never_comes_is_folded_into_the_next(monkeypatch):
    clock = iter([2.0, 9.0, 10.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    phases = StartPhases(started=0.0)
    phases.feed(LINES["imports"] + LINES["weights"])  # one read: both marks at 2.0
    phases.feed(LINES["compile"])
    phases.ready()
    assert phases.durations() == {"imports": 2.0, "engine_process": None, "weights": 0.0, "compile": 7.0,
                                  "serving": 1.0}
    assert "engine_process" not in phases.summary()


def test_the_fork_patch_applies_to_the_installed_vllm(monkeypatch):
    """Fails when vLLM changes under the patch (then the engine core is spawned again: 10 s more per start); the
    real starts in test_model_host.py show the fork's effect."""
    import inspect

    from vllm.platforms.cpu import CpuPlatform

    assert "VLLM_WORKER_MULTIPROC_METHOD" in inspect.getsource(CpuPlatform.check_and_update_config)

    def vllms_check(cls, config):  # what vLLM's own does to the start method, on a stand-in config
        checked.append(config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

    checked: list[str] = []
    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(vllms_check))
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert fork_engine_core.apply() is True
    assert fork_engine_core.apply() is True  # plugins may load more than once: wrapped once
    CpuPlatform.check_and_update_config("config")
    assert checked == ["config"] and os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
