"""The embedded default against float32 eager, through the servers: tokens/s and time to first token.

Two configs that differ only in the engine (the default: int8 W8A8 weights, bfloat16 activations where the CPU
has AVX512-BF16, compiled; the baseline: the float32 folder, float32, eager), each with its own model host and
standard front. The runners start one after the other (their start times are printed: compilation is the
default's price), then the same streamed greedy requests go through each front in alternating rounds, so
machine noise hits both alike. Prints absolute figures and the ratios default / float32 eager.

    .venv/bin/python -m bench.bench_decode [--rounds 3] [--requests 16] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.suite import MODEL_DIR, Run, bench_config, fronts, load, messages, models, wait_ready

EXPERT = "phi4_fast"
BASELINE = {"dtype": "float32", "enforce_eager": True}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        configs = {"float32 eager": bench_config(directory, warmup=[EXPERT], experts=[EXPERT], model=MODEL_DIR,
                                                 engine=BASELINE, name="float32.json"),
                   "default": bench_config(directory, warmup=[EXPERT], experts=[EXPERT], name="default.json")}
        urls = {}
        with ExitStack() as stack:
            for name, config in configs.items():  # one at a time, so neither start slows the other
                started = time.monotonic()
                logs = config.with_suffix("")
                logs.mkdir()
                (front,) = stack.enter_context(fronts(config, ("standard",), log_dir=logs))
                await wait_ready(front.url, [EXPERT], timeout=900)
                effective = (await models(front.url))[EXPERT]["engine"]["effective"]
                print(f"{name:>14}: ready {time.monotonic() - started:5.1f} s after its front started; "
                      f"{ {k: effective[k] for k in ('dtype', 'enforce_eager', 'preload')} }")
                urls[name] = front.url
            await compare(urls, args)


async def compare(urls: dict[str, str], args: argparse.Namespace) -> None:
    body = lambda i: {"model": EXPERT, "messages": messages(i), "temperature": 0,  # noqa: E731
                      "max_tokens": args.max_tokens, "ignore_eos": True}
    for url in urls.values():
        await load(url, body, 2, 2)  # warm-up
    print(f"{args.rounds} alternating rounds of streams of {args.max_tokens} tokens")
    print(f"{'streams':>8}{'f32 tok/s':>11}{'default tok/s':>15}{'ratio':>8}"
          f"{'f32 ttft ms':>13}{'default ttft ms':>17}{'ratio':>8}")
    for concurrency in (1, 8):
        runs: dict[str, list[Run]] = {name: [] for name in urls}
        requests = args.requests if concurrency > 1 else max(2, args.requests // 4)
        for _ in range(args.rounds):
            for name, url in urls.items():
                runs[name].append(await load(url, body, requests, concurrency))
        rate = {n: sum(r.tokens for r in rs) / sum(r.wall_s for r in rs) for n, rs in runs.items()}
        ttft = {n: Run(1, 0, [t for r in rs for t in r.ttft_s]).ttft_p50_ms for n, rs in runs.items()}
        base, new = "float32 eager", "default"
        print(f"{concurrency:>8}{rate[base]:>11.1f}{rate[new]:>15.1f}{rate[new] / rate[base]:>8.2f}"
              f"{ttft[base]:>13.1f}{ttft[new]:>17.1f}{ttft[new] / ttft[base]:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
