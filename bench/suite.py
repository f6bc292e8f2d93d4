"""What the runner benchmarks share: bench configs, fronts started as processes, a streaming load generator, and
today's design before the runners (a git worktree of it) to measure beside ours.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from core.config import relocatable
from core.models.paths import FLOAT32_MODEL

REPO = Path(__file__).resolve().parent.parent
# The float32 folder: the baseline of the decode bench, and the in-process design's model.
MODEL_DIR = FLOAT32_MODEL
# The last commit of the in-process design (three servers, each with its own engines): "today" in the benches.
IN_PROCESS_DESIGN = "4336cc8"
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how a steam engine works, in detail.",
           "Describe a journey across the Sahara desert.", "List the planets and describe each one."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_config(directory: Path, *, warmup: list[str], seeds: dict[str, int] | None = None,
                 experts: list[str] | None = None, engine: dict[str, Any] | None = None, model: Path | None = None,
                 sampling: dict[str, Any] | None = None, name: str = "bench.json", **server: Any) -> Path:
    """The embedded config with absolute model paths and its own run dir; `seeds` gives experts runners of their
    own; `experts` keeps only those; `engine`, `sampling` and `model` override every expert's."""
    raw = json.loads((REPO / "configs" / "embedded.json").read_text())
    if experts is not None:
        raw["experts"] = [e for e in raw["experts"] if e["id"] in experts]
    relocatable(raw, REPO / "configs")
    for expert in raw["experts"]:
        if model:
            expert["model"] = str(model)
        expert["engine"].update({"seed": (seeds or {}).get(expert["id"], 0), **(engine or {})})
        expert["sampling"].update(sampling or {})
    raw["server"].update({"warmup": warmup, "run_dir": str(directory / f"run-{Path(name).stem}"), **server})
    if raw["router"]["default_expert"] not in {e["id"] for e in raw["experts"]}:
        raw["router"]["default_expert"] = raw["experts"][0]["id"]
    path = directory / name
    path.write_text(json.dumps(raw))
    return path


@dataclass
class Front:
    kind: str
    url: str
    process: subprocess.Popen


@contextmanager
def fronts(config: Path, kinds: tuple[str, ...], repo: Path = REPO, log_dir: Path | None = None):
    """Servers of `repo` (ours, or the in-process design's worktree) on free ports; stopped on exit."""
    started: list[Front] = []
    log_dir = log_dir or config.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for kind in kinds:
            port = free_port()
            log = (log_dir / f"{kind}.log").open("w")
            process = subprocess.Popen([sys.executable, "-m", f"servers.{kind}", "--config", str(config),
                                        "--host", "127.0.0.1", "--port", str(port)], cwd=repo, stdout=log,
                                       stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(repo)})
            started.append(Front(kind, f"http://127.0.0.1:{port}", process))
        yield started
    finally:
        for front in started:
            front.process.send_signal(signal.SIGTERM)
        for front in started:
            try:
                front.process.wait(90)
            except subprocess.TimeoutExpired:
                front.process.kill()


async def wait_ready(url: str, experts: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as response:
                    states = (await response.json())["experts"]
                    if all(states[e]["state"] == "ready" for e in experts):
                        return
            except (aiohttp.ClientError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url}: {experts} not ready after {timeout} s")


async def models(url: str) -> dict[str, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models") as response:
            return {m["id"]: m for m in (await response.json())["data"]}


@dataclass
class Run:
    """One load's outcome: wall time, completion tokens, and each stream's time to first token."""

    wall_s: float
    tokens: int
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50_ms(self) -> float:
        return 1000 * statistics.median(self.ttft_s)


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, int]:
    """One streamed chat completion: (time to first token, completion tokens)."""
    started = time.monotonic()
    first = None
    tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.monotonic() - started
    return (first if first is not None else time.monotonic() - started), tokens


async def load(url: str, body_for, requests: int, concurrency: int, unix_socket: str | None = None,
               api_key: str | None = None) -> Run:
    """`requests` streamed chat completions, `concurrency` at a time; body_for(i) gives each request's body. A
    runner is reached on its `unix_socket` (url: any http://name) with its `api_key`."""
    semaphore = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tokens = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.UnixConnector(unix_socket) if unix_socket else None,
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else None) as session:
        async def one(i: int) -> None:
            nonlocal tokens
            async with semaphore:
                first, count = await stream_chat(session, url, body_for(i))
                ttft.append(first)
                tokens += count

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
    return Run(time.monotonic() - started, tokens, ttft)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


# ---------------------------------------------------------------- memory



# ---------------------------------------------------------------- today's design, for comparison


@contextmanager
def in_process_design(directory: Path):
    """A worktree of the in-process design, with the embedded model, for running its servers beside ours."""
    worktree = directory / "in-process"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(worktree),
                    IN_PROCESS_DESIGN], check=True, capture_output=True)
    try:
        yield worktree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)


def in_process_config(directory: Path, worktree: Path, *, warmup: list[str], experts: list[str] | None = None,
                      **server: Any) -> Path:
    """The in-process design's own embedded config with absolute model paths."""
    raw = json.loads((worktree / "configs" / "embedded.json").read_text())
    if experts is not None:
        raw["experts"] = [e for e in raw["experts"] if e["id"] in experts]
    for expert in raw["experts"]:
        expert["model"] = str(MODEL_DIR)
    raw["server"].update({"warmup": warmup, **server})
    if raw["router"]["default_expert"] not in {e["id"] for e in raw["experts"]}:
        raw["router"]["default_expert"] = raw["experts"][0]["id"]
    path = directory / "in-process.json"
    path.write_text(json.dumps(raw))
    return path
