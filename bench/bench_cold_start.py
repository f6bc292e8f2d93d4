"""Cold starts: a streamed request to an unloaded expert, before (a compiled runner started from nothing) and after
(a standby runner with vLLM imported becomes it, eager first, its compiled twin taking over behind it), in
alternating rounds of one run, each behind its own standard front and host.

Prints each start's phases (from /v1/models) and the time to the first token, with the ratio after / before; then
decoding tokens/s (1 and 8 streams) of the eager runner while its twin compiles, and of the compiled one after, each
against the runner of `before`, since a faster start must not cost decoding for good.

    .venv/bin/python -m bench.bench_cold_start [--rounds 2] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.suite import bench_config, fronts, load, messages, models, stream_chat, wait_ready
from core.config import load_config
from core.host.protocol import HostAddress
from core.host.runner_phases import PHASES
from core.local_ipc import SameUserConnector

EXPERT = "qwen_coder"
VARIANTS = {"before": ({"eager_first": False}, {"standby_runner": False}),
            "after": ({"eager_first": True}, {"standby_runner": True})}


async def unload(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/admin/experts/{EXPERT}/unload") as response:
            response.raise_for_status()


async def engine(url: str) -> dict:
    return (await models(url))[EXPERT]["engine"]


async def settle(url: str, config: Path, timeout: float = 300) -> None:
    """Until the runner, if loaded, is compiled (an eager twin replaced) and the host's standby, if it keeps one,
    is ready: the state a user's cold request meets."""
    app = load_config(config)
    address = HostAddress.for_config(config, app)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=SameUserConnector(str(address.socket))) as host:
        while time.monotonic() < deadline:
            running = await engine(url)
            async with host.get("http://host/states") as response:
                standby = orjson.loads(await response.read())["standby"]
            compiled = running["pid"] is None or not running["effective"]["enforce_eager"]
            if compiled and (not app.server.standby_runner or (standby is not None and standby["ready"])):
                return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{config.name}: not settled in {timeout} s")


async def cold_request(url: str, config: Path) -> tuple[float, dict]:
    """Time to the first token of a streamed request that starts the runner, and that start's record; the runner
    is unloaded again once compiled, so that one engine at a time has the cores."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        first_token, _ = await stream_chat(session, url, {"model": EXPERT, "messages": messages(0), "max_tokens": 8})
    await settle(url, config)
    start = (await engine(url))["last_start"]  # once compiled: when the twin took over, too
    await unload(url)
    await settle(url, config)
    return first_token, start


async def decode(url: str, body, streams: int) -> float:
    run = await load(url, body, max(2, streams), streams)
    return run.tokens_per_s


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {name: bench_config(Path(tmp), warmup=[], experts=[EXPERT], engine=engine_options,
                                      name=f"{name}.json", **server)
                   for name, (engine_options, server) in VARIANTS.items()}
        with fronts(configs["before"], ("standard",), log_dir=Path(tmp) / "run-before") as (before,), \
                fronts(configs["after"], ("standard",), log_dir=Path(tmp) / "run-after") as (after,):
            urls = {"before": before.url, "after": after.url}
            for name, url in urls.items():
                await wait_ready(url, [])
                await settle(url, configs[name])
            print(f"{args.rounds} alternating rounds; seconds per phase of each start, and to the first token")
            print(f"{'variant':>8}" + "".join(f"{name:>15}" for name in PHASES) + f"{'standby':>9}"
                  f"{'first token':>13}{'compiled after':>16}")
            firsts: dict[str, list[float]] = {name: [] for name in urls}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    first, start = await cold_request(url, configs[name])
                    firsts[name].append(first)
                    compiled = start.get("compiled_after_s")
                    print(f"{name:>8}" + "".join(f"{'-' if s is None else f'{s:.1f}':>15}"
                                                 for s in start["phases_s"].values())
                          + f"{str(start['from_standby']):>9}{first:>13.1f}"
                          + f"{'-' if compiled is None else f'{compiled:.1f}':>16}")
            median = {name: statistics.median(times) for name, times in firsts.items()}
            print(f"first token, median: before {median['before']:.1f} s, after {median['after']:.1f} s, "
                  f"ratio after / before {median['after'] / median['before']:.2f}")

            def body(i: int) -> dict:
                return {"model": EXPERT, "messages": messages(i), "max_tokens": args.max_tokens, "ignore_eos": True}

            print(f"{'streams':>8}{'before tok/s':>14}{'after, eager and compiling':>28}{'after, compiled':>17}")
            for streams in (1, 8):
                await load(urls["before"], body, 1, 1)  # loads it
                reference = await decode(urls["before"], body, streams)
                await unload(urls["before"])  # one engine at a time on the cores
                await load(urls["after"], body, 1, 1)  # an eager start, its twin compiling behind it
                eager = await decode(urls["after"], body, streams)
                await settle(urls["after"], configs["after"])
                compiled = await decode(urls["after"], body, streams)
                await unload(urls["after"])
                await settle(urls["after"], configs["after"])
                print(f"{streams:>8}{reference:>14.1f}{eager:>20.1f} ({eager / reference:.2f}x)"
                      f"{compiled:>10.1f} ({compiled / reference:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
