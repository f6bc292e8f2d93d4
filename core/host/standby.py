"""The standby runner: one process with torch and vLLM already imported, which the next runner start becomes.

A start spends its first ~10 s importing (docs/performance.md, issue 24). The pool keeps one standby
(`core.host.standby_process`) started while no runner is loading, so it never slows a start it is not part of. A
start whose environment is the standby's, save what belongs to that start alone, adopts it: the process gets the
runner's cores, its log, and its environment and command line on stdin, and goes on as a cold start would.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from core.host.runner_guard import RUNNER_ENV
from core.host.runner_log import OutputCopy, RotatingLog
from core.host.standby_process import READY_LINE

# What each start sets for itself; every other variable was read by the standby's imports and has to match.
PER_START = frozenset({"VLLM_API_KEY", RUNNER_ENV, "VLLM_CPU_OMP_THREADS_BIND"})


class StandbyGone(Exception):
    """The standby exited before it could be adopted."""


class Standby:
    """A started standby process, its output, and when its imports were done."""

    def __init__(self, process: asyncio.subprocess.Process, env: dict[str, str], pipe: int, log: RotatingLog,
                 started: float):
        self.process = process
        self.env = env
        self.started = started
        self.imports_s: float | None = None  # set when it says its imports are done
        self._seen = b""
        self.output = OutputCopy(pipe, log, self._watch)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, env: dict[str, str], log_path: Path) -> "Standby":
        """Launch it in its own process group with `env` (no API key in it); returns at once."""
        read_end, write_end = os.pipe()
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "core.host.standby_process", stdin=asyncio.subprocess.PIPE,
                stdout=write_end, stderr=write_end, env={**env, RUNNER_ENV: str(log_path)}, start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return cls(process, env, read_end, RotatingLog(log_path), started)

    def _watch(self, chunk: bytes) -> None:
        if self.imports_s is None:
            self._seen = (self._seen + chunk)[-4096:]
            if READY_LINE.encode() in self._seen:
                self.imports_s = round(time.monotonic() - self.started, 2)

    def fits(self, env: dict[str, str]) -> bool:
        """Whether a start with `env` can adopt it: it still runs and imported under the same environment."""
        def shared(variables: dict[str, str]) -> dict[str, str]:
            return {name: value for name, value in variables.items() if name not in PER_START}
        return self.process.returncode is None and shared(self.env) == shared(env)

    async def adopt(self, argv: list[str], env: dict[str, str], cpus: set[int], log: RotatingLog,
                    watch) -> tuple[asyncio.subprocess.Process, OutputCopy]:
        """Make it the runner `argv` and `env` describe: its threads on `cpus`, its output into `log`."""
        for thread in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(thread.name), cpus)
            except (ProcessLookupError, OSError):
                pass
        self.output.switch(log, watch)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"argv": argv, "env": env}).encode() + b"\n")
            await self.process.stdin.drain()
        except (ConnectionError, OSError) as error:
            raise StandbyGone from error
        finally:
            self.process.stdin.close()
        return self.process, self.output

    async def stop(self) -> None:
        """Gone, with anything it started; returns once it has exited."""
        self.kill_now()
        await self.process.wait()
        await asyncio.wait([self.output.task], timeout=1.0)

    def kill_now(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def describe(self) -> dict[str, object]:
        return {"pid": self.pid, "ready": self.imports_s is not None, "imports_s": self.imports_s}
