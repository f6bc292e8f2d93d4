"""8083's low time to first token, under mixed load on one expert.

Background: more long streams through the standard front (8082's kind, priority 0) than the runner runs at once,
so requests queue. Probes: short streams through the streaming front (8083's kind, priority -10) and through the
standard front, alternating. Prints each probe kind's time to first token, and the same probes on an idle runner.

    .venv/bin/python -m bench.bench_priority [--background 12] [--probes 8]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench.suite import bench_config, fronts, messages, stream_chat, wait_ready

EXPERT = "phi4_fast"


async def probe_ttft(session: aiohttp.ClientSession, urls: dict[str, str], probes: int) -> dict[str, float]:
    """Median time to first token (ms) of short probes through each front, alternating."""
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for i in range(probes):
        for name, url in urls.items():
            body = {"model": EXPERT, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
            first, _ = await stream_chat(session, url, body)
            samples[name].append(first)
            await asyncio.sleep(0.3)
    return {name: 1000 * statistics.median(values) for name, values in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--background", type=int, default=12, help="concurrent long streams through 8082's kind")
    parser.add_argument("--probes", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), warmup=[EXPERT])
        with fronts(config, ("standard", "streaming")) as (standard, streaming):
            await wait_ready(standard.url, [EXPERT])
            urls = {"8083 (streaming)": streaming.url, "8082 (standard)": standard.url}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
                idle = await probe_ttft(session, urls, 2)
                stop = asyncio.Event()

                async def background(i: int) -> None:
                    """Streams of varied lengths, started apart, so that slots free up all the time."""
                    await asyncio.sleep(0.4 * i)
                    length = 60 + (i * 37) % 200
                    while not stop.is_set():
                        await stream_chat(session, standard.url, {"model": EXPERT, "messages": messages(i),
                                                                  "max_tokens": length, "ignore_eos": True})

                workers = [asyncio.create_task(background(i)) for i in range(args.background)]
                await asyncio.sleep(0.4 * args.background + 5)
                loaded = await probe_ttft(session, urls, args.probes)
                stop.set()
                await asyncio.gather(*workers)
    print(f"{'probe through':<20}{'idle ttft ms':>14}{'loaded ttft ms':>16}")
    for name in urls:
        print(f"{name:<20}{idle[name]:>14.1f}{loaded[name]:>16.1f}")
    print(f"loaded ttft ratio, 8083 / 8082: {loaded['8083 (streaming)'] / loaded['8082 (standard)']:.3f} "
          f"({args.background} background streams through 8082, max_num_seqs 8)")


if __name__ == "__main__":
    asyncio.run(main())
