"""Server overhead: the same workload on the bare in-process engine and through the HTTP servers.

Measures load time, tokens/s at 1 and 8 concurrent requests (full responses, port-8082 kind) and
time to first token / inter-token latency of streams (port-8083 kind), then prints each HTTP figure
as a ratio of the bare engine's, all in one run so machine noise hits both sides alike.

    .venv/bin/python -m bench.bench_server [--requests 8] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.config import EMBEDDED_CONFIG, load_config  # noqa: E402
from core.engines import GenerationRequest, SamplingSettings, create_engine  # noqa: E402

EXPERT = "phi4_fast"
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how a steam engine works, in detail.",
           "Describe a journey across the Sahara desert.", "List the planets and describe each one."]


@dataclass
class Run:
    """One workload's outcome: wall time, tokens, and per-request first-token and inter-token times."""

    wall_s: float
    tokens: int
    ttft_s: list[float]
    itl_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def row(self) -> dict[str, float]:
        return {"tok/s": self.tokens_per_s, "ttft p50 ms": 1000 * statistics.median(self.ttft_s),
                "itl p50 ms": 1000 * statistics.median(self.itl_s) if self.itl_s else float("nan")}


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


async def bare_engine(requests: int, concurrency: int, max_tokens: int, engine) -> Run:
    ttft, itl, tokens = [], [], 0

    async def one(i: int) -> None:
        nonlocal tokens
        sampling = SamplingSettings(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=-1)
        request = GenerationRequest(f"bench-{concurrency}-{i}", sampling, messages=tuple(messages(i)))
        started, last = time.monotonic(), None
        async for delta in engine.generate(request):
            now = time.monotonic()
            if delta.new_tokens:
                if last is None:
                    ttft.append(now - started)
                else:
                    itl.append((now - last) / delta.new_tokens)
                last = now
                tokens += delta.new_tokens

    return await _in_waves(one, requests, concurrency, lambda wall: Run(wall, tokens, ttft, itl))


async def over_http(url: str, requests: int, concurrency: int, max_tokens: int, stream: bool) -> Run:
    ttft, itl, tokens = [], [], 0
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            nonlocal tokens
            body = {"model": EXPERT, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
            started, last = time.monotonic(), None
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                if not stream:
                    payload = await response.json()
                    ttft.append(time.monotonic() - started)
                    tokens += payload["usage"]["completion_tokens"]
                    return
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    now = time.monotonic()
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
                    elif chunk["choices"][0]["delta"].get("content"):
                        if last is None:
                            ttft.append(now - started)
                        else:
                            itl.append(now - last)
                        last = now

        return await _in_waves(one, requests, concurrency, lambda wall: Run(wall, tokens, ttft, itl))


async def _in_waves(one, requests: int, concurrency: int, finish) -> Run:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> None:
        async with semaphore:
            await one(i)

    started = time.monotonic()
    await asyncio.gather(*(limited(i) for i in range(requests)))
    return finish(time.monotonic() - started)


def start_server(kind: str, config_path: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"servers.{kind}", "--config", str(config_path), "--port",
                             str(port)], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def wait_ready(url: str, timeout: float = 300) -> float:
    """Wait for the warm expert; returns its load time as the server measured it."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/stats") as response:
                    stats = await response.json()
                    if stats["experts"][EXPERT]["state"] == "ready":
                        return stats["experts"][EXPERT]["last_load_s"]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{url} never got {EXPERT} ready")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=18183)
    args = parser.parse_args()
    config = load_config(EMBEDDED_CONFIG)
    expert = config.expert(EXPERT)

    results: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    engine = await create_engine(expert)
    load = {"bare engine": time.monotonic() - started}
    await bare_engine(1, 1, 8, engine)  # warm-up
    for concurrency in (1, 8):
        results[f"engine c={concurrency}"] = (await bare_engine(args.requests, concurrency, args.max_tokens,
                                                                engine)).row()
    await engine.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        raw = json.loads(EMBEDDED_CONFIG.read_text())
        raw["server"]["warmup"] = [EXPERT]
        for item in raw["experts"]:
            item["model"] = str((EMBEDDED_CONFIG.parent / item["model"]).resolve())
        config_path = Path(tmp) / "bench.json"
        config_path.write_text(json.dumps(raw))
        server = start_server("streaming", config_path, args.port, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{args.port}"
        try:
            load["HTTP server (warm-up)"] = await wait_ready(url)
            await over_http(url, 1, 1, 8, stream=True)
            for concurrency in (1, 8):
                for stream in (False, True):
                    label = f"http {'stream' if stream else 'full'} c={concurrency}"
                    results[label] = (await over_http(url, args.requests, concurrency, args.max_tokens,
                                                      stream)).row()
        finally:
            server.terminate()
            server.wait(60)

    print("\nload time (s):", ", ".join(f"{k} {v:.2f}" for k, v in load.items()))
    print(f"\n{'workload':<22}{'tok/s':>9}{'ratio':>8}{'ttft p50 ms':>13}{'ratio':>8}{'itl p50 ms':>12}{'ratio':>8}")
    for label, row in results.items():
        base = results[f"engine c={label.rsplit('=', 1)[1]}"]
        ratios = [row[k] / base[k] for k in ("tok/s", "ttft p50 ms", "itl p50 ms")]
        print(f"{label:<22}{row['tok/s']:>9.1f}{ratios[0]:>8.2f}{row['ttft p50 ms']:>13.1f}{ratios[1]:>8.2f}"
              f"{row['itl p50 ms']:>12.1f}{ratios[2]:>8.2f}")
    print("\nratios are HTTP / bare engine at the same concurrency (tok/s: higher is better; latency: lower).")
    print("'full' responses have no inter-token figure and their ttft is the whole response time.")


if __name__ == "__main__":
    asyncio.run(main())
