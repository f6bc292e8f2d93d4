"""The front's overhead: the same streamed requests sent straight to the expert's runner and through the
standard front (8082's kind), in alternating rounds of one run, at 1, 8 and 16 concurrent streams.

Both sides sample alike: through the front the expert's defaults apply (temperature, top_p); straight to the
runner (on its unix socket, with the key of its start, both from a lease the bench takes from the host and gives
back at once) each request carries them and the system prompt, as the front would add them. Prints tokens/s and
time to first token of each, and the ratio front / runner (1.00 means no overhead).

    .venv/bin/python -m bench.bench_server [--rounds 3] [--requests 16] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.suite import Run, bench_config, fronts, load, messages, wait_ready
from core.config import load_config
from core.front.host_client import HostClient
from core.host.protocol import Grant, HostAddress

EXPERT = "phi4_fast"


async def runner_grant(config: Path) -> Grant:
    """The runner's socket and key, as the fronts get them; the slot is given back at once (the key holds for
    the runner's life)."""
    client = HostClient(config, HostAddress.for_config(config, load_config(config)))
    await client.start()
    try:
        async with client.lease(EXPERT) as grant:
            return grant
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), warmup=[EXPERT])
        expert = load_config(config).expert(EXPERT)
        with fronts(config, ("standard",)) as (front,):
            await wait_ready(front.url, [EXPERT])
            grant = await runner_grant(config)
            length = {"max_tokens": args.max_tokens, "ignore_eos": True}
            defaults = {"temperature": expert.sampling.temperature, "top_p": expert.sampling.top_p}
            through_front = lambda i: {"model": EXPERT, "messages": messages(i), **length}  # noqa: E731
            straight = lambda i: {"model": grant.model, **length, **defaults,  # noqa: E731
                                  "messages": [{"role": "system", "content": expert.system_prompt}, *messages(i)]}
            on_socket = {"unix_socket": grant.socket, "api_key": grant.api_key}
            targets = {"runner": ("http://runner", straight, on_socket), "front": (front.url, through_front, {})}
            await load(front.url, through_front, 2, 2)  # warm-up
            print(f"runner pid {grant.pid} on {grant.socket}; {args.rounds} alternating rounds of "
                  f"{args.requests} streams of {args.max_tokens} tokens, temperature {defaults['temperature']}, "
                  f"top_p {defaults['top_p']}")
            print(f"{'streams':>8}{'runner tok/s':>14}{'front tok/s':>13}{'ratio':>8}{'runner ttft ms':>16}"
                  f"{'front ttft ms':>15}")
            for concurrency in (1, 8, 16):
                totals: dict[str, list[Run]] = {name: [] for name in targets}
                for _ in range(args.rounds):
                    for name, (url, body, where) in targets.items():
                        requests = args.requests if concurrency > 1 else max(2, args.requests // 2)
                        totals[name].append(await load(url, body, requests, concurrency, **where))
                rate = {n: sum(r.tokens for r in runs) / sum(r.wall_s for r in runs) for n, runs in totals.items()}
                ttft = {n: Run(1, 0, [t for r in runs for t in r.ttft_s]).ttft_p50_ms for n, runs in totals.items()}
                print(f"{concurrency:>8}{rate['runner']:>14.1f}{rate['front']:>13.1f}"
                      f"{rate['front'] / rate['runner']:>8.3f}{ttft['runner']:>16.1f}{ttft['front']:>15.1f}")


if __name__ == "__main__":
    asyncio.run(main())
