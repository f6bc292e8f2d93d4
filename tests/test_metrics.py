"""Measuring the suite: /metrics parses as Prometheus text and moves with traffic, and the latency
tools run against real servers (experts on the fake upstream, short workloads) and leave valid JSON,
markdown reports and PNG charts that open."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, fake_engine, make_config, write_config

BENCH = REPO / "bench"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHAT = "/v1/chat/completions"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (sample name, sorted labels), through prometheus_client's parser."""
    response = requests.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(url: str, content: str, model: str | None = "phi4_fast", timeout: float = 30, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    if model:
        body["model"] = model
    return requests.post(url + CHAT, json=body, timeout=timeout)


@pytest.fixture
def server(start_server, tmp_path, fake_upstream):
    """A fresh server with a model host of its own, so load counts start from zero."""
    config, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    return start_server("standard", config)


def test_metrics_have_the_standard_names_and_types(server):
    response = requests.get(f"{server.url}/metrics", timeout=5)
    types = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    expected = {
        "counter": ("capibara_requests", "capibara_http_errors", "capibara_tokens", "capibara_route_decisions"),
        "histogram": ("capibara_request_latency_seconds", "capibara_time_to_first_token_seconds"),
        # load counts are the model host's, read at scrape time: gauges of this front
        "gauge": ("capibara_loaded_experts", "capibara_queue_depth", "capibara_active_requests",
                  "capibara_active_streams", "capibara_expert_loads", "capibara_expert_unloads"),
    }
    assert {name: types.get(name) for names in expected.values() for name in names} == \
        {name: kind for kind, names in expected.items() for name in names}


def test_metrics_counters_move_with_requests(server):
    url = server.url
    before = scrape(url)
    assert value(before, "capibara_loaded_experts") == 0
    ok = chat(url, "hello metrics world")
    assert ok.status_code == 200
    with requests.post(url + CHAT, json={"model": "phi4_fast", "stream": True, "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "stream these words"}]},
                       stream=True, timeout=30) as streamed:
        assert b"[DONE]" in b"".join(streamed.iter_content(None))
    assert chat(url, "this breaks [[fail]]", model="mistral_balanced").status_code >= 500
    assert chat(url, "hello", model="nope").status_code == 404
    assert chat(url, "write a python function", model=None).status_code == 200
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("capibara_requests_total", expert="phi4_fast", outcome="ok") == 2
    assert delta("capibara_requests_total", expert="mistral_balanced", outcome="error") == 1
    assert delta("capibara_tokens_total", expert="phi4_fast", kind="completion") == \
        ok.json()["usage"]["completion_tokens"] + 4  # + "echo: stream these words"
    assert delta("capibara_tokens_total", expert="phi4_fast", kind="prompt") >= 6
    assert delta("capibara_request_latency_seconds_count", expert="phi4_fast") == 2
    assert delta("capibara_request_latency_seconds_count", expert="mistral_balanced") == 1
    assert delta("capibara_time_to_first_token_seconds_count", expert="phi4_fast") == 1  # streams only
    assert delta("capibara_expert_loads", expert="phi4_fast", outcome="ok") == 1
    assert delta("capibara_expert_loads", expert="phi4_fast", outcome="failed") == 0
    assert delta("capibara_http_errors_total", status="404") == 1
    assert delta("capibara_http_errors_total", status="502") == 1  # every error status is counted, 5xx too
    routed = [key for key in after if key[0] == "capibara_route_decisions_total"]
    assert sum(delta(name, **dict(labels)) for name, labels in routed) == 1
    loaded = value(after, "capibara_loaded_experts")
    assert loaded >= 1 and value(after, "capibara_queue_depth", expert="phi4_fast") == 0

    # experts with the same model and engine settings share a runner: unloading one unloads them all
    states = server.stats()["experts"]
    runner = states["phi4_fast"]["runner"]["key"]
    sharing = [e for e, state in states.items() if state["runner"]["key"] == runner and state["state"] == "ready"]
    assert "phi4_fast" in sharing
    assert requests.post(f"{url}/admin/experts/phi4_fast/unload", timeout=10).status_code == 200
    unloaded = scrape(url)
    assert value(unloaded, "capibara_expert_unloads", expert="phi4_fast") == 1
    assert value(unloaded, "capibara_loaded_experts") == loaded - len(sharing)


def test_metrics_gauges_show_requests_in_flight(server):
    url = server.url
    assert chat(url, "warm up").status_code == 200
    done = threading.Event()

    def slow_stream() -> None:
        with requests.post(url + CHAT, json={"model": "phi4_fast", "stream": True, "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "wait [[sleep=4]] here"}]},
                           stream=True, timeout=30) as response:
            b"".join(response.iter_content(None))
        done.set()

    worker = threading.Thread(target=slow_stream)
    worker.start()
    try:
        deadline = time.monotonic() + 2.5
        while value(scrape(url), "capibara_active_requests", expert="phi4_fast") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        during = scrape(url)
        assert value(during, "capibara_active_requests", expert="phi4_fast") == 1
        assert value(during, "capibara_active_streams") == 1
    finally:
        worker.join(30)
    assert done.is_set()
    idle = scrape(url)
    assert value(idle, "capibara_active_requests", expert="phi4_fast") == 0
    assert value(idle, "capibara_active_streams") == 0


def test_metrics_on_the_real_vllm_engine(vllm_server):
    before = scrape(vllm_server.url)
    body = {"model": "phi4_fast", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(vllm_server.url + CHAT, json=body, stream=True, timeout=120) as response:  # 2 shared cores
        assert response.status_code == 200, response.text
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    usage = json.loads(lines[-2].removeprefix(b"data: "))["usage"]
    after = scrape(vllm_server.url)
    tokens = usage["completion_tokens"]
    assert tokens > 0
    assert value(after, "capibara_requests_total", expert="phi4_fast", outcome="ok") - \
        value(before, "capibara_requests_total", expert="phi4_fast", outcome="ok") == 1
    assert value(after, "capibara_tokens_total", expert="phi4_fast", kind="completion") - \
        value(before, "capibara_tokens_total", expert="phi4_fast", kind="completion") == tokens
    assert value(after, "capibara_tokens_total", expert="phi4_fast", kind="prompt") - \
        value(before, "capibara_tokens_total", expert="phi4_fast", kind="prompt") == usage["prompt_tokens"]
    assert value(after, "capibara_time_to_first_token_seconds_count", expert="phi4_fast") - \
        value(before, "capibara_time_to_first_token_seconds_count", expert="phi4_fast") == 1
    assert value(after, "capibara_loaded_experts") >= 1
    assert value(after, "capibara_expert_loads", expert="phi4_fast", outcome="ok") >= 1


# ---------------------------------------------------------------- latency tools

def strict_json(path: Path) -> dict:
    """JSON as any consumer reads it: NaN or Infinity would be a bug in the writer."""
    def reject(constant: str) -> None:
        raise AssertionError(f"{path} contains {constant}")
    return json.loads(path.read_text(), parse_constant=reject)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def assert_report(markdown: Path) -> list[Path]:
    """The markdown report exists and every chart it shows is a PNG that opens."""
    text = markdown.read_text()
    assert text.startswith("# ") and "|---|" in text
    charts = [markdown.parent / line.split("](")[1].rstrip(")") for line in text.splitlines()
              if line.startswith("![")]
    assert charts, f"{markdown} shows no charts"
    for chart in charts:
        assert_png(chart)
    return charts


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


WORKLOAD = ["--repeats", "2", "--pause", "0.1", "--max-tokens", "6", "--warmup", "1"]


def test_latency_safe_measures_one_request_at_a_time_and_survives_errors(fake_server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there capybara\nthis one breaks [[fail]]\n")
    out = tmp_path / "latency"
    run_tool("test_latency_safe.py", "--url", fake_server.url, "--models", "phi4_fast", "qwen_coder", "nope",
             "--prompts", str(prompts), "--out", str(out), *WORKLOAD)
    results = strict_json(out / "latency.json")
    samples = results["samples"]
    assert len(samples) == 3 * 2 * 2
    assert [s["model"] for s in samples] == ["phi4_fast"] * 4 + ["qwen_coder"] * 4 + ["nope"] * 4, "a model at a time"
    for previous, current in zip(samples, samples[1:]):
        assert current["started_s"] >= previous["finished_s"] + 0.09, "never two requests at once, pauses between"
    for sample in samples:
        assert sample["ok"] == (sample["model"] != "nope" and sample["prompt_index"] == 0)
    assert {s["status"] for s in samples if s["model"] == "nope"} == {404}
    assert all("error in stream" in s["error"] for s in samples if s["model"] != "nope" and not s["ok"])
    summary = results["summary"]
    for model in ("phi4_fast", "qwen_coder"):
        figures = summary["models"][model]
        assert (figures["requests"], figures["errors"], figures["completion_tokens"]) == (4, 2, 2 * 4)
        assert figures["tokens_per_s"] > 0 and 0 < figures["latency_p50_s"] <= figures["latency_p95_s"]
        assert figures["ttft_p50_s"] <= figures["latency_p50_s"]
    assert summary["models"]["nope"]["errors"] == 4 and summary["overall"]["requests"] == 12
    assert results["server"]["server"] == "standard"
    assert results["server"]["models"]["phi4_fast"]["kind"] == "remote"
    charts = assert_report(out / "latency.md")
    assert {c.name for c in charts} == {"latency_latency.png", "latency_throughput.png"}
    assert "HTTP 404" in (out / "latency.md").read_text()


@pytest.fixture(scope="module")
def before_after(tmp_path_factory, fake_upstream) -> Path:
    """latency_comparison_test with two configs: each server started by its script, measured, stopped. The
    "slow" config's experts are the fake upstream's model that waits 50 ms before each token."""
    tmp = tmp_path_factory.mktemp("before-after")
    configs = []
    for name, model in (("slow.json", "echo[[delay=0.05]]"), ("fast.json", "echo")):
        path, config = make_config(tmp, engine="fake", upstream=fake_upstream.url, name=name)
        for index in range(len(config["experts"])):
            fake_engine(config, index, model)
        configs.append(str(write_config(path, config)))
    out = tmp / "report"
    run_tool("latency_comparison_test.py", "--before", configs[0], "--after", configs[1], "--labels", "slow", "fast",
             "--models", "phi4_fast", "--out", str(out), *WORKLOAD)
    return out


def test_latency_comparison_starts_each_config_and_reports_the_change(before_after):
    for side in ("before", "after"):
        results = strict_json(before_after / f"{side}.json")
        assert results["summary"]["overall"]["errors"] == 0 and len(results["samples"]) == 10
        assert_report(before_after / f"{side}.md")
        assert (before_after / f"{side}-server" / "server.log").exists()
        assert not (before_after / f"{side}-server" / "server.pid").exists(), "the server was stopped"
    comparison = strict_json(before_after / "comparison.json")
    assert (comparison["before"]["label"], comparison["after"]["label"]) == ("slow", "fast")
    latency = comparison["overall"]["latency_mean_s"]
    assert latency["after"] < latency["before"] and latency["change_pct"] < 0 and latency["better"] is True
    assert comparison["overall"]["tokens_per_s"]["better"] is True
    assert len(assert_report(before_after / "comparison.md")) == 3


def test_compare_optimization_results_on_saved_files(before_after, tmp_path):
    out = tmp_path / "cmp"
    result = run_tool("compare_optimization_results.py", str(before_after / "before.json"),
                      str(before_after / "after.json"), "--labels", "before", "after", "--out", str(out))
    assert "mean latency" in result.stdout and "better" in result.stdout
    comparison = strict_json(out / "comparison.json")
    before, after = (strict_json(before_after / f"{side}.json")["summary"]["overall"] for side in ("before", "after"))
    for key in ("latency_mean_s", "latency_std_s", "latency_p50_s", "latency_p95_s", "tokens_per_s"):
        row = comparison["overall"][key]
        assert (row["before"], row["after"]) == (before[key], after[key])
        assert row["change_pct"] == round((after[key] - before[key]) / before[key] * 100, 1)
    assert set(comparison["models"]) == {"phi4_fast"}
    report = (out / "comparison.md").read_text()
    assert "| mean latency (s) |" in report and "%" in report
    assert_report(out / "comparison.md")


def test_latency_comparison_between_two_running_servers(fake_server, tmp_path):
    out = tmp_path / "urls"
    run_tool("latency_comparison_test.py", "--before", fake_server.url, "--after", fake_server.url,
             "--models", "qwen_coder", "--repeats", "1", "--pause", "0.05", "--max-tokens", "4", "--out", str(out))
    comparison = strict_json(out / "comparison.json")
    assert comparison["before"]["label"] != comparison["after"]["label"], "same URL twice still gets two legends"
    assert set(comparison["models"]) == {"qwen_coder"}
    assert_report(out / "comparison.md")
