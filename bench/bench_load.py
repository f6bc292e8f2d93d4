"""Load on a streaming server: requests/s, p50/p95/p99 latency and error counts at 1, 8, 32 and 64 clients.

Starts a streaming server (the 8083 kind) on the embedded config with one warm expert on a free loopback port,
or measures a running one with --url. At each level, that many clients send streaming chat requests back to back.
A level sends a bounded number of requests. Latency is the time until the stream's [DONE]. An error is any
answer that is not a complete, error-free stream: an HTTP error status, an error event, or a stream cut short.

    .venv/bin/python -m bench.bench_load [--url http://127.0.0.1:8083] [--max-tokens 16] [--per-client 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.config import EMBEDDED_CONFIG, relocatable  # noqa: E402
from core.harness.load import EXPERT, StreamResult, chat_body, stream_chat  # noqa: E402

LEVELS = (1, 8, 32, 64)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
@dataclass
class Level:
    """The outcome of one concurrency level."""

    clients: int
    wall_s: float
    results: list[StreamResult]

    def latencies(self) -> list[float]:
        return sorted(r.latency_s for r in self.results if r.complete)

    def errors(self) -> Counter[str]:
        return Counter(r.failure for r in self.results if r.failure)

    def row(self) -> str:
        latencies = self.latencies()
        cells = [percentile(latencies, q) * 1000 if latencies else float("nan") for q in (50, 95, 99)]
        errors = self.errors()
        described = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "-"
        return (f"{self.clients:>7}{len(self.results):>9}{len(latencies) / self.wall_s:>8.1f}"
                + "".join(f"{c:>10.0f}" for c in cells) + f"{sum(errors.values()):>8}   {described}")


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run_level(url: str, clients: int, requests: int, max_tokens: int, model: str) -> Level:
    """`clients` concurrent clients send `requests` streaming requests in all, each client one after another."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    results: list[StreamResult] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                results.append(await stream_chat(session, url, chat_body(index, max_tokens, model)))

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return Level(clients, time.monotonic() - started, results)


# ---------------------------------------------------------------- a server of our own


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_config(directory: Path, model: str) -> Path:
    """The embedded config with `model` warm and able to admit 64 streams at once (the engine batches 32)."""
    raw = relocatable(json.loads(EMBEDDED_CONFIG.read_text()), EMBEDDED_CONFIG.parent)
    raw["server"].update(warmup=[model], host="127.0.0.1")
    for expert in raw["experts"]:
        if expert["id"] == model:
            expert.update(max_concurrency=max(LEVELS), max_queue=max(LEVELS))
            expert["engine"]["max_num_seqs"] = 32
    path = directory / "bench_load.json"
    path.write_text(json.dumps(raw))
    return path


async def wait_ready(url: str, model: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as response:
                    if (await response.json())["experts"][model]["state"] == "ready":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url}: {model} not ready after {timeout:g} s")


async def measure(url: str, args: argparse.Namespace) -> list[Level]:
    await run_level(url, 8, 8, args.max_tokens, args.model)  # warm-up: first-request costs are not load
    levels = []
    for clients in LEVELS:
        requests = max(clients * args.per_client, args.min_requests)
        levels.append(await run_level(url, clients, requests, args.max_tokens, args.model))
        print(f"  {clients} clients done", file=sys.stderr, flush=True)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running streaming server on this machine (default: start one)")
    parser.add_argument("--model", default=EXPERT)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must be a loopback address: this tool loads a server, it is not for remote hosts")

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.url
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(Path(tmp) / "server.log", "w") as log:
                server = subprocess.Popen([sys.executable, "-m", "servers.streaming", "--config",
                                           str(load_config(Path(tmp), args.model)), "--port", str(port)],
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            if server is not None:  # ours warms the expert at start; on another server the warm-up run loads it
                asyncio.run(wait_ready(url, args.model))
            levels = asyncio.run(measure(url, args))
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)

    print(f"\n{url}, expert {args.model}, {args.max_tokens} tokens a request, streamed\n")
    print(f"{'clients':>7}{'requests':>9}{'req/s':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for level in levels:
        print(level.row())


if __name__ == "__main__":
    main()
