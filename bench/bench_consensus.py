"""Consensus wall time against the sum and the max of its candidates' times.

If the candidates really run in parallel, a consensus request costs about its slowest candidate plus the
synthesis, not the sum of all of them. This starts a consensus server, sends a few no-model requests, and reads
every candidate's latency from the `consensus` object of the response.

    .venv/bin/python bench/bench_consensus.py                 # the fake upstream, known per-token delays
    .venv/bin/python bench/bench_consensus.py --engine vllm   # the embedded SmolLM2 experts on vLLM
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.config import EMBEDDED_CONFIG, parse_config, relocatable  # noqa: E402
from core.protocol import ChatMessage  # noqa: E402
from core.router import Router  # noqa: E402

PROMPTS = (
    "What is the capital of France and why is it famous?",
    "Explain how TCP congestion control works in simple terms.",
    "Write a Python function that reverses a linked list.",
    "Give me three tips for sleeping better at night.",
    "Compare REST and GraphQL for the backend of a mobile app.",
)
# Per-token delays of the fake upstream's model for each expert (the fake echoes the prompt, a word a token).
# Their order follows the typical latencies in the spec.
FAKE_DELAYS = {"phi4_fast": 0.03, "qwen_coder": 0.04, "mistral_balanced": 0.05,
               "aya_expanse_multilingual": 0.07, "gemma3_multimodal": 0.08}


def fake_model(expert_id: str) -> str:
    """The fake upstream's model name that answers at the expert's per-token delay."""
    return f"echo[[delay={FAKE_DELAYS.get(expert_id, 0.05)}]]"


def build_config(engine: str, k: int, max_tokens: int, directory: Path,
                 upstream: str | None = None) -> tuple[Path, list[str]]:
    """The embedded config for the chosen engine, with a model host of its own under `directory`. It returns the
    experts the prompts will use, which are warmed up. On the fake engine, every expert is a remote expert on the
    fake upstream at `upstream`."""
    config = relocatable(json.loads(EMBEDDED_CONFIG.read_text()), EMBEDDED_CONFIG.parent)
    config["consensus"].update(experts_per_request=k, candidate_max_tokens=max_tokens, candidate_timeout_s=600)
    for expert in config["experts"]:
        if engine != "vllm":
            expert["model"] = "echo"
            expert["engine"] = {"kind": "remote", "base_url": upstream, "remote_model": fake_model(expert["id"])}
    router = Router.from_config(parse_config(config, EMBEDDED_CONFIG.parent))
    used = sorted({e for p in PROMPTS
                   for e in router.route((ChatMessage(role="user", content=p),)).ranking()[:k]})
    config["server"].update(warmup=used, max_loaded_experts=max(len(used), k), log_file=None,
                            run_dir=str(directory / "run"), host_linger_s=1)
    path = directory / "consensus.json"
    path.write_text(json.dumps(config))
    return path, used


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_fake_upstream(log: Path) -> tuple[subprocess.Popen, str]:
    """tests/fake_upstream.py on a free port, serving a model for each expert's delay."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models = sorted({fake_model(e) for e in FAKE_DELAYS} | {fake_model("")})
    process = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port),
                                "--models", ",".join(models)], cwd=REPO, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"fake upstream exited {process.returncode}; see {log}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.terminate()
    raise SystemExit(f"fake upstream not up after 30 s; see {log}")


def start_server(config: Path, log: Path, experts: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """Start the consensus server and wait until every expert the prompts use is loaded."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "servers.consensus", "--config", str(config),
                                "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited {process.returncode}; see {log}")
        try:
            states = requests.get(url + "/health", timeout=2).json()["experts"]
            if all(states[e]["state"] == "ready" for e in experts):
                return process, url
            failed = [e for e in experts if states[e]["state"] == "failed"]
            if failed:
                raise SystemExit(f"experts failed to load: {failed}; see {log}")
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"experts not ready after {timeout:g} s; see {log}")


def measure(url: str, prompt: str, max_tokens: int) -> dict:
    """One consensus request: the wall time seen by the client, plus what the consensus object reports."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    started = time.monotonic()
    response = requests.post(url + "/v1/chat/completions", json=body, timeout=1800)
    wall = time.monotonic() - started
    response.raise_for_status()
    consensus = response.json()["consensus"]
    latencies = [e["latency_s"] for e in consensus["experts"] if e["ok"]]
    return {"wall_s": wall, "sum_s": sum(latencies), "max_s": max(latencies), "fanout_s": consensus["fanout_s"],
            "synthesis_s": consensus["synthesis_s"], "experts": [e["id"] for e in consensus["experts"]],
            "method": consensus["method"], "agreement": consensus["agreement"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("fake", "vllm"), default="fake",
                        help="fake: every expert on tests/fake_upstream.py at a known per-token delay")
    parser.add_argument("--experts", type=int, default=3, help="experts per request (k)")
    parser.add_argument("--rounds", type=int, default=1, help="times each prompt is sent")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap of candidates and synthesis (default: 32 on vllm, 256 on the fake upstream)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    max_tokens = args.max_tokens or (32 if args.engine == "vllm" else 256)

    with tempfile.TemporaryDirectory() as tmp:
        upstream, upstream_url = (None, None) if args.engine == "vllm" else \
            start_fake_upstream(Path(tmp) / "fake_upstream.log")
        try:
            config, experts = build_config(args.engine, args.experts, max_tokens, Path(tmp), upstream_url)
            print(f"engine={args.engine} k={args.experts} max_tokens={max_tokens} warming {', '.join(experts)}",
                  flush=True)
            if args.engine == "fake":
                print("per-token delays: " + ", ".join(f"{e}={FAKE_DELAYS[e]}" for e in experts))
            process, url = start_server(config, Path(tmp) / "server.log", experts,
                                        timeout=1800 if args.engine == "vllm" else 60)
            try:
                measure(url, PROMPTS[0], max_tokens)  # the first request of a fresh engine is not representative
                rows = [measure(url, prompt, max_tokens) for _ in range(args.rounds) for prompt in PROMPTS]
            finally:
                process.terminate()
                process.wait(60)
                time.sleep(2)  # the model host (and its runners) stop once no server is attached
        finally:
            if upstream is not None:
                upstream.terminate()
                upstream.wait(30)

    print(f"\n{'wall s':>7} {'sum s':>7} {'max s':>7} {'fanout':>7} {'synth':>7} {'w/serial':>8} {'w/par':>6}  "
          "experts   (serial = sum + synth, par = max + synth)")
    for row in rows:
        serial, parallel = row["sum_s"] + row["synthesis_s"], row["max_s"] + row["synthesis_s"]
        print(f"{row['wall_s']:7.3f} {row['sum_s']:7.3f} {row['max_s']:7.3f} {row['fanout_s']:7.3f} "
              f"{row['synthesis_s']:7.3f} {row['wall_s'] / serial:8.2f} {row['wall_s'] / parallel:6.2f}  "
              f"{','.join(row['experts'])} ({row['method']}, agreement {row['agreement']:.2f})")
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    summary = {
        "fanout_over_sum": round(mean("fanout_s") / mean("sum_s"), 3),
        "fanout_over_max": round(mean("fanout_s") / mean("max_s"), 3),
        "wall_over_sum_plus_synthesis": round(mean("wall_s") / (mean("sum_s") + mean("synthesis_s")), 3),
        "wall_over_max_plus_synthesis": round(mean("wall_s") / (mean("max_s") + mean("synthesis_s")), 3),
    }
    print("\nmean ratios (1.0 against max means perfectly parallel, 1.0 against sum means serial):")
    for key, value in summary.items():
        print(f"  {key:30} {value:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"engine": args.engine, "k": args.experts, "max_tokens": max_tokens,
                                         "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
