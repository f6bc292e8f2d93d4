"""Two experts truly in parallel: consensus over two experts on runners of their own, against the slower
candidate measured alone, beside the in-process design (one engine stepped at a time) in the same run.

The two experts differ in their engine seed, so each gets a runner (and, on this machine, a core) of its own.
Greedy decoding makes each candidate write the same tokens alone and in the fan-out.

    .venv/bin/python -m bench.bench_parallel [--max-tokens 96] [--repeats 2]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.suite import bench_config, fronts, in_process_config, in_process_design, wait_ready

EXPERTS = ["phi4_fast", "qwen_coder"]
QUESTION = [{"role": "user", "content": "Explain in detail how a bicycle works, part by part."}]


async def timed(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, dict]:
    started = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        payload = await response.json()
        assert response.status == 200, payload
    return time.monotonic() - started, payload


async def ratio(config: Path, repo: Path | None, max_tokens: int, repeats: int) -> dict[str, float]:
    """Seconds of each candidate alone, of the fan-out, and the fan-out over the slower candidate."""
    with fronts(config, ("consensus",), **({"repo": repo} if repo else {})) as (front,):
        await wait_ready(front.url, EXPERTS)
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            await timed(session, front.url, {**body, "model": EXPERTS[0], "max_tokens": 4})  # warm-up
            alone = {e: statistics.median([(await timed(session, front.url, {**body, "model": e}))[0]
                                           for _ in range(repeats)]) for e in EXPERTS}
            fanouts = []
            for _ in range(repeats):
                _, payload = await timed(session, front.url, body)
                consensus = payload["consensus"]
                assert sorted(c["id"] for c in consensus["experts"]) == sorted(EXPERTS), consensus
                fanouts.append(consensus["fanout_s"])
    fanout = statistics.median(fanouts)
    return {**{f"{e} alone s": alone[e] for e in EXPERTS}, "fan-out s": fanout,
            "fan-out / slower": fanout / max(alone.values())}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-in-process", action="store_true", help="measure the runners only")
    args = parser.parse_args()
    consensus = {"experts_per_request": 2, "aggregator": EXPERTS[0], "candidate_max_tokens": args.max_tokens}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ours = bench_config(directory, warmup=EXPERTS, experts=EXPERTS, seeds={EXPERTS[1]: 1}, max_loaded_experts=2)
        _set_consensus(ours, consensus)
        rows["runners (one per expert)"] = await ratio(ours, None, args.max_tokens, args.repeats)
        if not args.skip_in_process:
            with in_process_design(directory) as worktree:
                today = in_process_config(directory, worktree, warmup=EXPERTS, experts=EXPERTS,
                                          max_loaded_experts=2)
                _set_consensus(today, consensus)
                rows["in-process (one step at a time)"] = await ratio(today, worktree, args.max_tokens,
                                                                      args.repeats)
    columns = list(next(iter(rows.values())))
    print(f"{'design':<34}" + "".join(f"{c:>20}" for c in columns))
    for label, row in rows.items():
        print(f"{label:<34}" + "".join(f"{row[c]:>20.3f}" for c in columns))


def _set_consensus(path: Path, settings: dict) -> None:
    import json
    raw = json.loads(path.read_text())
    raw["consensus"].update(settings)
    path.write_text(json.dumps(raw))


if __name__ == "__main__":
    asyncio.run(main())
