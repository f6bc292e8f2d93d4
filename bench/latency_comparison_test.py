"""Run the same latency workload before and after an optimisation and write one report.

Each side is either a URL (a server already running) or a config file. For a config, the server
is started here through its own start script on a free port, measured, and stopped before the
other side starts, so the two never compete for the CPU. The workload is test_latency_safe's
(one request at a time, pauses, warm-up) with the same models and prompts on both sides.

Writes in --out: before.json/.md/.png and after.* (each a normal latency report) and
comparison.json/.md/.png (compare_optimization_results).

    python bench/latency_comparison_test.py --before configs/embedded.json --after /tmp/axion.json --out results/axion
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare_optimization_results import compare, summary_line, write_comparison
from bench.reporting import default_out_dir
from bench.test_latency_safe import (TRANSPORT_ERRORS, add_workload_arguments, list_models, run_benchmark,
                                     workload_from_args, write_report)

START_SCRIPTS = Path(__file__).resolve().parent.parent / "start_scripts"
SCRIPTS = {"standard": "start_all_models_server.sh", "streaming": "start_streaming_server.sh",
           "consensus": "start_consensus_server.sh"}


class ServerStartFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(target: str, kind: str, run_dir: Path) -> Iterator[str]:
    """The URL to measure: the target itself, or a server started from the target config for the
    duration of the block (its log and pid file in run_dir)."""
    if target.startswith(("http://", "https://")):
        yield target.rstrip("/")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    prefix = f"CAPIBARA_{kind.upper()}_"
    env = {**os.environ, "CAPIBARA_CONFIG": str(Path(target).resolve()), f"{prefix}HOST": "127.0.0.1",
           f"{prefix}PORT": str(port), f"{prefix}LOG": str(run_dir / "server.log"),
           f"{prefix}PID_FILE": str(run_dir / "server.pid")}
    script = str(START_SCRIPTS / SCRIPTS[kind])
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        raise ServerStartFailed(f"{target}: {started.stderr or started.stdout}")
    print(started.stdout, end="", file=sys.stderr)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="URL of a running server, or a config file to start one")
    parser.add_argument("--after", required=True, help="URL of a running server, or a config file to start one")
    parser.add_argument("--server", choices=sorted(SCRIPTS), default="standard",
                        help="which server to start for a config side")
    parser.add_argument("--labels", nargs=2, metavar=("BEFORE", "AFTER"), help="names in the report")
    parser.add_argument("--out", type=Path, default=default_out_dir("before-after"))
    add_workload_arguments(parser)
    args = parser.parse_args(argv)
    workload = workload_from_args(args)
    labels = args.labels or [args.before, args.after]
    models = args.models
    runs: list[dict] = []
    files: list[Path] = []
    for side, target, label in zip(("before", "after"), (args.before, args.after), labels):
        try:
            with serve(target, args.server, args.out / f"{side}-server") as url:
                models = models or list_models(url)
                results = run_benchmark(url, models, workload, label)
        except (ServerStartFailed, *TRANSPORT_ERRORS) as error:
            parser.exit(1, f"{side}: {error}\n")
        files += write_report(results, args.out, stem=side)
        runs.append(results)
    comparison = compare(*runs)
    files += write_comparison(comparison, args.out)
    print(summary_line(comparison))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
