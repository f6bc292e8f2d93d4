"""The suite's memory with runners shared by the three fronts, beside the in-process design in the same run.

Starts the three servers on the embedded default (warm-up pool of two experts), sends each one request, and sums
the PSS of every process of the suite (fronts, model host, runners; shared pages counted once). Then does the same
with the in-process design (a git worktree of it), whose three servers each load their own engines.

    .venv/bin/python -m bench.bench_memory
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.suite import bench_config, fronts, in_process_config, in_process_design, load, messages, wait_ready
from core.harness.processes import host_pids, process_tree, suite_pss

KINDS = ("standard", "streaming", "consensus")
WARM = ["phi4_fast", "qwen_coder"]


async def measure(config: Path, repo: Path | None) -> tuple[int, int]:
    """(PSS of the suite in bytes, processes) once every front has its warm experts and has answered once."""
    with fronts(config, KINDS, **({"repo": repo} if repo else {})) as started:
        for front in started:
            await wait_ready(front.url, WARM)
        for front in started:
            body = lambda i: {"model": WARM[0], "messages": messages(i), "max_tokens": 16}  # noqa: E731
            await load(front.url, body, 1, 1)
        await asyncio.sleep(2)
        roots = [f.process.pid for f in started] + host_pids(config)
        processes = len({pid for root in roots for pid in process_tree(root)})
        return suite_pss(config, [f.process.pid for f in started]), processes


async def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ours, ours_processes = await measure(bench_config(directory, warmup=WARM), None)
        with in_process_design(directory) as worktree:
            today, today_processes = await measure(in_process_config(directory, worktree, warmup=WARM), worktree)
    gib = 2 ** 30
    print(f"{'design':<34}{'processes':>10}{'PSS GiB':>10}")
    print(f"{'in-process (each server its own)':<34}{today_processes:>10}{today / gib:>10.2f}")
    print(f"{'runners shared by the fronts':<34}{ours_processes:>10}{ours / gib:>10.2f}")
    print(f"ratio (runners / in-process): {ours / today:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
