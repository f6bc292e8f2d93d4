"""Where a runner's start goes: vLLM's own log lines end each phase, timed as they arrive on the runner's output.

The markers are vLLM 0.32's messages (`tests/test_runner_phases.py` fails when a real start stops printing one). A
phase whose marker never comes (an eager runner has no compile warm-up to speak of) is folded into the next one.
"""
from __future__ import annotations

import re
import time

# (phase, the line that ends it); the last phase ends when the runner answers /health.
_MARKERS: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("imports", re.compile(rb"\[api_utils\.py:\d+\] non-default args")),  # API server: interpreter, vLLM, args
    ("engine_process", re.compile(rb"Initializing a V1 LLM engine")),  # engine-core process started and imported
    ("weights", re.compile(rb"Loading weights took")),  # model built, weights read
    ("compile", re.compile(rb"init engine \(profile, create kv cache, warmup model\) took")),  # warm-up, KV cache
)
LAST_PHASE = "serving"  # the API server's own start after the engine: tokenizer, chat template, routes
PHASES = tuple(name for name, _ in _MARKERS) + (LAST_PHASE,)
_LINE_TAIL = 4096  # a partial line kept between reads; markers are near the start of their line


class StartPhases:
    """The marks of one runner start; `feed` it the runner's output, call `ready` when it answers."""

    def __init__(self, started: float):
        self.started = started
        self.marks: dict[str, float] = {}
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        if len(self.marks) >= len(_MARKERS):
            return
        now = time.monotonic()
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[:_LINE_TAIL]
        for line in lines:
            for name, marker in _MARKERS:
                if name not in self.marks and marker.search(line):
                    self.marks[name] = now

    def ready(self) -> None:
        self.marks[LAST_PHASE] = time.monotonic()

    def durations(self) -> dict[str, float | None]:
        """Seconds per phase, in order; None for a phase whose marker never came (its time is in the next)."""
        spent: dict[str, float | None] = {}
        previous = self.started
        for name in PHASES:
            at = self.marks.get(name)
            spent[name] = None if at is None else round(at - previous, 2)
            previous = previous if at is None else at
        return spent

    def summary(self) -> str:
        """One line for the host's log: 'imports 10.1 s, engine_process 9.8 s, ...'."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.durations().items()
                         if seconds is not None)
