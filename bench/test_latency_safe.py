"""Latency and tokens/s per model, measured gently: one request at a time, one model at a time,
with a pause after every request.

Why so gentle: firing requests back to back measures the server's queue, not its latency, and
used to stall it. Each model is warmed up first (a cold expert's first request includes its load,
reported separately), a failed request is recorded and the run goes on, and 429/503 answers are
retried after their Retry-After. Requests stream, so the time to first token is measured too.

    python bench/test_latency_safe.py --url http://127.0.0.1:8082 --repeats 3 --out results/latency
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reporting import (METRICS, RESULTS_FORMAT, bar_chart, box_chart, default_out_dir, fmt, markdown_table,
                             summarise, write_json, write_markdown)

DEFAULT_PROMPTS = (
    "What is the capital of Australia? Answer in one sentence.",
    "Explain the difference between TCP and UDP in three short points.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe what makes a good landscape photograph.",
    "Translate 'good morning, how are you?' into Spanish and French.",
)
RETRYABLE = (429, 503)
# refused, reset, timed out, cut off mid-body, or not the JSON expected
TRANSPORT_ERRORS = (OSError, ValueError, KeyError, http.client.HTTPException)
MAX_RETRY_WAIT_S = 30.0


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...]
    repeats: int
    max_tokens: int
    pause_s: float
    warmup: int
    retries: int
    timeout_s: float


class RequestFailed(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _headers() -> dict[str, str]:
    key = os.environ.get("CAPIBARA_API_KEY")
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def _error_message(error: urllib.error.HTTPError) -> str:
    body = error.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200] or str(error.reason)


def _seconds(header: str | None) -> float | None:
    try:
        return float(header) if header else None
    except ValueError:  # an HTTP date: fall back to the pause
        return None


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=_headers()), timeout=timeout) as response:
        return json.load(response)


def server_info(url: str) -> dict[str, Any]:
    """What the server says it runs (engine settings and their platform warnings), kept with the
    results so a before/after report shows what actually differed."""
    models = get_json(f"{url}/v1/models")["data"]
    return {"server": get_json(f"{url}/health").get("server"),
            "models": {m["id"]: m.get("engine", {}) for m in models}}


def chat_once(url: str, model: str, prompt: str, workload: Workload) -> dict[str, Any]:
    """One streamed chat completion: wall latency, time to the first text, and token usage."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": workload.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=_headers(), method="POST")
    started = time.perf_counter()
    ttft = None
    usage: dict[str, int] = {}
    text_chunks = 0
    done = False
    try:
        with urllib.request.urlopen(request, timeout=workload.timeout_s) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RequestFailed(f"error in stream: {event['error'].get('message')}")
                if any(choice.get("delta", {}).get("content") for choice in event.get("choices", ())):
                    text_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                usage = event.get("usage") or usage
    except urllib.error.HTTPError as error:
        raise RequestFailed(f"HTTP {error.code}: {_error_message(error)}", error.code,
                            _seconds(error.headers.get("Retry-After"))) from None
    except TRANSPORT_ERRORS as error:
        raise RequestFailed(f"{type(error).__name__}: {error}") from None
    if not done:
        raise RequestFailed("the stream ended without [DONE]")
    latency = time.perf_counter() - started
    tokens = usage.get("completion_tokens", text_chunks)
    return {"latency_s": round(latency, 4), "ttft_s": None if ttft is None else round(ttft, 4),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None}


def measure(url: str, model: str, prompt: str, workload: Workload) -> dict[str, Any]:
    """chat_once, retried on 429/503 after the server's Retry-After; never raises."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return {"ok": True, "status": 200, "error": None, "attempts": attempt,
                    **chat_once(url, model, prompt, workload)}
        except RequestFailed as failure:
            if failure.status in RETRYABLE and attempt <= workload.retries:
                time.sleep(min(failure.retry_after or workload.pause_s, MAX_RETRY_WAIT_S))
                continue
            return {"ok": False, "status": failure.status, "error": str(failure), "attempts": attempt,
                    "latency_s": None, "ttft_s": None, "prompt_tokens": None, "completion_tokens": 0,
                    "tokens_per_s": None}


def list_models(url: str) -> list[str]:
    return [model["id"] for model in get_json(f"{url}/v1/models")["data"]]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(url: str, models: list[str], workload: Workload, label: str) -> dict[str, Any]:
    """The whole run as one results document (the format every report and comparison reads)."""
    url = url.rstrip("/")
    started_at = datetime.now(timezone.utc)
    try:
        info = server_info(url)
    except TRANSPORT_ERRORS as error:
        info = {"error": f"{type(error).__name__}: {error}"}
    clock = time.perf_counter()
    samples: list[dict[str, Any]] = []
    warmups: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        warmups[model] = []
        for _ in range(workload.warmup):
            warmups[model].append(measure(url, model, workload.prompts[0], workload))
            _log(f"{model} warm-up: {_describe(warmups[model][-1])}")
            time.sleep(workload.pause_s)
        total = len(workload.prompts) * workload.repeats
        for number in range(total):
            repeat, index = divmod(number, len(workload.prompts))
            began = time.perf_counter() - clock
            sample = {"model": model, "prompt_index": index, "repeat": repeat,
                      **measure(url, model, workload.prompts[index], workload),
                      "started_s": round(began, 4), "finished_s": round(time.perf_counter() - clock, 4)}
            samples.append(sample)
            _log(f"{model} {number + 1}/{total}: {_describe(sample)}")
            time.sleep(workload.pause_s)
    return {"format": RESULTS_FORMAT, "label": label, "url": url,
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": asdict(workload), "server": info, "warmup": warmups, "samples": samples,
            "summary": summarise(samples)}


def _describe(sample: dict[str, Any]) -> str:
    if not sample["ok"]:
        return f"failed ({sample['error']})"
    return f"{sample['latency_s']:.3f} s, {sample['completion_tokens']} tokens, {sample['tokens_per_s']} tok/s"


def write_report(results: dict[str, Any], out_dir: Path, stem: str = "latency") -> list[Path]:
    """<stem>.json (the results), <stem>.md, and two charts the markdown shows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = results["summary"]
    models = list(summary["models"])
    latencies = {m: [s["latency_s"] for s in results["samples"] if s["model"] == m and s["ok"]] for m in models}
    charts = [
        box_chart(out_dir / f"{stem}_latency.png", f"Latency per request: {results['label']}", "seconds", latencies),
        bar_chart(out_dir / f"{stem}_throughput.png", f"Generation speed: {results['label']}", "tokens/s", models,
                  {results["label"]: [summary["models"][m]["tokens_per_s"] for m in models]}),
    ]
    headers = ["model", "requests", "errors"] + [m.header for m in METRICS if m.key != "error_rate"]
    rows = [[name, figures["requests"], figures["errors"],
             *(fmt(figures[m.key], m.unit) for m in METRICS if m.key != "error_rate")]
            for name, figures in [*summary["models"].items(), ("**all**", summary["overall"])]]
    workload = results["workload"]
    lines = [f"# Latency: {results['label']}", "",
             f"Server {results['url']}, {results['started_at']} to {results['finished_at']}. "
             f"{len(workload['prompts'])} prompts x {workload['repeats']} repeats per model, max_tokens "
             f"{workload['max_tokens']}, one request at a time with {workload['pause_s']} s pauses, "
             f"{workload['warmup']} warm-up request(s) per model not counted.", "",
             markdown_table(headers, rows), ""]
    lines += [f"![{chart.stem}]({chart.name})" for chart in charts] + [""]
    warm = [(m, w) for m, runs in results["warmup"].items() for w in runs[:1]]
    if warm:
        lines += ["## First request (includes loading a cold expert)", "",
                  markdown_table(["model", "result"], [(m, _describe(w)) for m, w in warm]), ""]
    errors = [s for s in results["samples"] if not s["ok"]]
    if errors:
        lines += ["## Errors", ""] + [f"- {s['model']}, prompt {s['prompt_index']}, repeat {s['repeat']}: "
                                      f"{s['error']}" for s in errors] + [""]
    notes = {m: e.get("warnings") for m, e in results["server"].get("models", {}).items() if e.get("warnings")}
    if notes:
        lines += ["## Settings the server could not honour", ""]
        lines += [f"- {m}: {warning}" for m, warnings in notes.items() for warning in warnings] + [""]
    return [write_json(out_dir / f"{stem}.json", results), write_markdown(out_dir / f"{stem}.md", lines), *charts]


def read_prompts(path: Path | None) -> tuple[str, ...]:
    """A JSON list of strings, or a text file with one prompt per line."""
    if path is None:
        return DEFAULT_PROMPTS
    text = path.read_text()
    prompts = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
    prompts = tuple(p.strip() for p in prompts if p.strip())
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload options, shared with latency_comparison_test so both sides run the same thing."""
    parser.add_argument("--models", nargs="+", help="expert ids (default: every model the server lists)")
    parser.add_argument("--prompts", type=Path, help="JSON list or one prompt per line (default: 5 built in)")
    parser.add_argument("--repeats", type=int, default=2, help="times each prompt is sent to each model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between requests")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted requests per model first")
    parser.add_argument("--retries", type=int, default=2, help="retries of a 429/503 answer")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(prompts=read_prompts(args.prompts), repeats=args.repeats, max_tokens=args.max_tokens,
                    pause_s=args.pause, warmup=args.warmup, retries=args.retries, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8082")
    parser.add_argument("--label", help="name in the report (default: the URL)")
    parser.add_argument("--out", type=Path, default=default_out_dir("latency"))
    add_workload_arguments(parser)
    args = parser.parse_args(argv)
    workload = workload_from_args(args)
    try:
        models = args.models or list_models(args.url.rstrip("/"))
    except TRANSPORT_ERRORS as error:
        parser.exit(1, f"cannot list the models of {args.url}: {error}\n")
    results = run_benchmark(args.url, models, workload, args.label or args.url)
    files = write_report(results, args.out)
    overall = results["summary"]["overall"]
    print(f"{overall['requests']} requests, {overall['errors']} errors, mean latency "
          f"{fmt(overall['latency_mean_s'], 's')} s, {fmt(overall['tokens_per_s'], 'tok/s')} tokens/s")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
