"""Routing throughput and latency on short and long prompts: the router must stay far below a token's cost.

Run from the repository root: ``.venv/bin/python bench/bench_router.py`` (target: p99 < 0.3 ms at 2,000 chars).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import EMBEDDED_CONFIG, load_config  # noqa: E402
from core.protocol import ChatMessage  # noqa: E402
from core.router import Router  # noqa: E402

_SHORT = (  # about 50 characters each, one per kind of decision
    "What is a good name for a golden retriever puppy?",
    "Write a Python function that merges two sorted lists",
    "Explain how DNS resolution works, step by step.",
    "¿Cuál es la mejor época del año para viajar a Japón?",
    "Translate 'where is the train station' into German.",
)
_LONG_SEEDS = (
    "I am planning a trip with my family and would like some advice about what to pack, where to stay and "
    "which sights the children would enjoy most. We like museums, parks and good food. ",
    "Our service keeps timing out under load. The database has a connection pool of twenty, the load balancer "
    "spreads traffic across three replicas and latency grows with throughput. Explain what could cause this. ",
    "def handler(event):\n    items = [parse(x) for x in event['records']]\n    return {'count': len(items)}\n",
    "Necesito escribir una carta formal para solicitar un puesto de trabajo en una empresa de tecnología, "
    "¿me puedes ayudar a redactarla con un tono profesional y cercano? ",
)


def _long(seed: str, length: int = 2000) -> str:
    return (seed * (length // len(seed) + 1))[:length]


def _measure(router: Router, prompts: list[str], rounds: int) -> tuple[float, float, float]:
    """Per-call latencies in ms over `rounds` passes: (p50, p99, decisions per second)."""
    messages = [(ChatMessage(role="user", text=p),) for p in prompts]
    for _ in range(10):  # warm caches and code paths
        for m in messages:
            router.route(m)
    latencies = []
    started = time.perf_counter()
    for _ in range(rounds):
        for m in messages:
            t0 = time.perf_counter()
            router.route(m)
            latencies.append((time.perf_counter() - t0) * 1000.0)
    wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return quantiles[49], quantiles[98], len(latencies) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(EMBEDDED_CONFIG))
    parser.add_argument("--rounds", type=int, default=5000, help="decisions measured per row")
    args = parser.parse_args()

    started = time.perf_counter()
    router = Router.from_config(load_config(args.config))
    fit_ms = (time.perf_counter() - started) * 1000.0
    cases = {
        "short (~50 chars)": list(_SHORT),
        "long (2,000 chars)": [_long(seed) for seed in _LONG_SEEDS],
    }
    print(f"router fitted in {fit_ms:.1f} ms ({len(router.experts)} experts)")
    print(f"{'prompts':<20} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8}")
    for name, prompts in cases.items():
        p50, p99, rate = _measure(router, prompts, max(1, args.rounds // len(prompts)))
        print(f"{name:<20} {rate:>12,.0f} {p50:>8.3f} {p99:>8.3f}")


if __name__ == "__main__":
    main()
