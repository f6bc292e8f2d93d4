"""End-to-end effect of neon_ext inside runners: tokens/s of the same expert with and without our custom ops.

Two runners of the same model, one with ``neon_kernels`` (the vLLM general plugin replaces its layers), run the
same greedy workload in alternating rounds, so machine noise hits both alike; prints tokens/s of each and the
ratio (ours / vLLM's own ops). Our kernels are float32 and replace vLLM's custom ops, which run only eagerly, so
both runners serve the float32 folder eagerly (the compiled int8 default uses neither).

    .venv/bin/python -m bench.bench_neon_engine [--rounds 3] [--requests 8] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from bench.suite import MODEL_DIR, bench_config, fronts, load, messages, wait_ready

EXPERTS = {"vLLM ops": "mistral_balanced", "neon_ext ops": "phi4_fast"}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), warmup=list(EXPERTS.values()), experts=list(EXPERTS.values()),
                              model=MODEL_DIR, engine={"dtype": "float32", "enforce_eager": True},
                              max_loaded_experts=2)
        raw = json.loads(config.read_text())
        for expert in raw["experts"]:
            expert["engine"]["neon_kernels"] = expert["id"] == EXPERTS["neon_ext ops"]
            expert["engine"]["cpu_cores"] = "0-1"  # both on every core, measured one at a time
        config.write_text(json.dumps(raw))
        with fronts(config, ("standard",)) as (front,):
            await wait_ready(front.url, list(EXPERTS.values()))
            bodies = {label: (lambda i, e=expert: {"model": e, "messages": messages(i), "temperature": 0,
                                                    "max_tokens": args.max_tokens, "ignore_eos": True})
                      for label, expert in EXPERTS.items()}
            for body in bodies.values():
                await load(front.url, body, 1, 1)  # warm-up
            for concurrency in (1, 8):
                totals = {label: [0, 0.0] for label in bodies}
                for _ in range(args.rounds):
                    for label, body in bodies.items():
                        run = await load(front.url, body, args.requests if concurrency > 1 else 2, concurrency)
                        totals[label][0] += run.tokens
                        totals[label][1] += run.wall_s
                rates = {label: tokens / seconds for label, (tokens, seconds) in totals.items()}
                print(f"c={concurrency}: " + ", ".join(f"{label} {rate:.1f} tok/s" for label, rate in rates.items())
                      + f", ratio {rates['neon_ext ops'] / rates['vLLM ops']:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
