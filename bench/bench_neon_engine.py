"""End-to-end effect of neon_ext in vLLM: tokens/s of the same expert with and without our custom ops.

Both engines live in this process and run the same greedy workload in alternating rounds, so machine noise
hits both alike; prints tokens/s of each and the ratio (ours / vLLM's own ops).

    .venv/bin/python -m bench.bench_neon_engine [--rounds 3] [--requests 8] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio

from bench.bench_server import EXPERT, bare_engine
from core.config import EMBEDDED_CONFIG, load_config
from core.engines import create_engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    expert = load_config(EMBEDDED_CONFIG).expert(EXPERT)
    engines = {}
    for label, enabled in (("vLLM ops", False), ("neon_ext ops", True)):
        options = expert.engine.model_copy(update={"neon_kernels": enabled})
        engines[label] = await create_engine(expert.model_copy(update={"engine": options}))
        await bare_engine(1, 1, 8, engines[label])  # warm-up
    totals = {label: [0, 0.0] for label in engines}
    for concurrency in (1, 8):
        for label in totals:
            totals[label] = [0, 0.0]
        for _ in range(args.rounds):
            for label, engine in engines.items():
                run = await bare_engine(args.requests, concurrency, args.max_tokens, engine)
                totals[label][0] += run.tokens
                totals[label][1] += run.wall_s
        rates = {label: tokens / seconds for label, (tokens, seconds) in totals.items()}
        print(f"c={concurrency}: " + ", ".join(f"{label} {rate:.1f} tok/s" for label, rate in rates.items())
              + f", ratio {rates['neon_ext ops'] / rates['vLLM ops']:.3f}")
    for engine in engines.values():
        await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
