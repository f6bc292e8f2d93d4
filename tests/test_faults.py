"""Faults stay contained: a load that fails, an engine that raises while generating, an engine that hangs past its
timeout. Each gives the affected requests a clear, retryable error (503/504 with Retry-After) while the other
experts keep answering. Each shows in /health and /stats, and the expert recovers on a later request. SIGTERM lets
in-flight requests finish, unloads the engines and exits 0. The servers bind to loopback unless told otherwise, and
no error message carries a stack trace or a file path.

The fault paths run on the scripted engine, whose faults are exact. The real vLLM engine covers what only it can
show: a model directory that does not exist, a generation aborted at its timeout, and shutdown of a live engine.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from core.config import EMBEDDED_CONFIG, ServerConfig, load_config
from tests.conftest import MODEL_DIR, REPO, Server, free_port, make_config, write_config

CHAT = "/v1/chat/completions"
PATH = re.compile(r"(?:/[\w.@+-]+){2,}")
TRACE = re.compile(r"Traceback|File \"|line \d+, in ")


def chat(server: Server, model: str, content: str = "hello there", timeout: float = 60,
         **extra) -> requests.Response:
    return requests.post(server.url + CHAT, timeout=timeout,
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def assert_clean(message: str | None) -> None:
    """What a client reads about a failure never shows our internals: no stack trace, no file path."""
    assert message is None or not (PATH.search(message) or TRACE.search(message)), message


def assert_retryable(response: requests.Response, status: int, code: str) -> dict:
    """A retryable error in OpenAI's shape: the status, a Retry-After of at least a second, a clean message."""
    assert response.status_code == status, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert_clean(error["message"])
    return error


def expert_health(server: Server, expert: str) -> dict:
    health = server.health()["experts"][expert]
    assert_clean(health["error"])
    return health


def wait_idle(server: Server, expert: str, timeout: float = 10.0) -> dict:
    """The expert's /stats once nothing is left running on it: no request, no engine work, no open stream."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        mine = stats["experts"][expert]
        if (mine["active_requests"], mine["engine_in_flight"], stats["active_streams"]) == (0, 0, 0):
            return mine
        assert time.monotonic() < deadline, f"{expert} still busy: {mine}"
        time.sleep(0.1)


def sse_events(response: requests.Response) -> list:
    """The events of a finished SSE response: decoded chunks, and "[DONE]" as a string."""
    assert response.headers["Content-Type"] == "text/event-stream"
    blocks = response.content.decode("utf-8").split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1]), blocks[-3:]
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


def start_scripted(tmp_path: Path, start_server, experts: dict[str, dict], **server_options) -> Server:
    """A standard server on the scripted engine; `experts` maps an id to its overrides (engine ones under "engine")."""
    path, config = make_config(tmp_path, engine="test", **server_options)
    for expert in config["experts"]:
        overrides = dict(experts.get(expert["id"], {}))
        expert["engine"].update(overrides.pop("engine", {}))
        expert.update(overrides)
    return start_server("standard", write_config(path, config))


# ---------------------------------------------------------------- an engine that raises while generating


def test_engine_error_is_a_retryable_503_for_that_expert_only_and_it_reloads(tmp_path, start_server):
    """A failed generation marks the expert failed, so the next request gets a fresh engine, not the broken one."""
    server = start_scripted(tmp_path, start_server, {})
    assert chat(server, "phi4_fast").status_code == 200

    assert_retryable(chat(server, "mistral_balanced", "a [[fail]] b"), 503, "engine_failed")
    health = expert_health(server, "mistral_balanced")
    assert health["state"] == "failed" and "scripted failure" in health["error"]
    stats = server.stats()["experts"]["mistral_balanced"]
    assert (stats["errors"], stats["loads"]) == (1, 1)

    assert chat(server, "phi4_fast").status_code == 200  # the other experts are untouched
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}

    recovered = chat(server, "mistral_balanced")
    assert recovered.status_code == 200 and recovered.json()["choices"][0]["message"]["content"] == "echo: hello there"
    assert expert_health(server, "mistral_balanced") == {"state": "ready", "error": None}
    stats = wait_idle(server, "mistral_balanced")
    assert (stats["errors"], stats["loads"], stats["requests"]) == (1, 2, 2)


# ---------------------------------------------------------------- an engine hung past its timeout


def test_hung_engine_is_a_retryable_504_at_its_timeout_while_others_answer(tmp_path, start_server):
    """A hang costs its caller the timeout and nothing more: the hung generation is cancelled, not left holding a
    slot, and the other experts answer meanwhile."""
    server = start_scripted(tmp_path, start_server, {
        "qwen_coder": {"request_timeout_s": 2, "engine": {"test_fault": "hang"}},
        "phi4_fast": {"request_timeout_s": 1}})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        hung = pool.submit(chat, server, "qwen_coder")
        time.sleep(0.2)
        other = chat(server, "phi4_fast")
        other_s = time.monotonic() - started
        hung_response, hung_s = hung.result(), time.monotonic() - started
    assert other.status_code == 200 and other_s < 2.0, other_s  # answered while qwen_coder hung
    error = assert_retryable(hung_response, 504, "timeout")
    assert "qwen_coder" in error["message"] and error["type"] == "timeout_error"
    assert 2.0 <= hung_s < 6.0, hung_s

    stream = chat(server, "qwen_coder", stream=True)  # no chunk was sent yet, so the error is plain JSON
    assert_retryable(stream, 504, "timeout")
    stats = wait_idle(server, "qwen_coder")  # the hung generations were cancelled, not left running
    assert stats["errors"] == 2 and stats["requests"] == 2
    health = expert_health(server, "qwen_coder")
    assert health["state"] == "ready" and "did not finish" in health["error"]

    assert_retryable(chat(server, "phi4_fast", "[[hang]] once"), 504, "timeout")  # one request hangs ...
    assert "did not finish" in expert_health(server, "phi4_fast")["error"]
    assert chat(server, "phi4_fast").status_code == 200  # ... and the next one is answered again
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}


def test_timeout_in_mid_stream_ends_the_stream_with_an_error_event(tmp_path, start_server):
    """Once chunks have gone out the status is already 200, so the timeout can only be told in the stream."""
    server = start_scripted(tmp_path, start_server, {
        "phi4_fast": {"request_timeout_s": 1, "engine": {"test_token_delay_s": 0.3}}})
    response = chat(server, "phi4_fast", " ".join(["word"] * 12), stream=True)
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error"
    assert_clean(error["message"])
    assert 1 <= len(events[:-2]) < 12  # some tokens arrived before the deadline, not all
    assert wait_idle(server, "phi4_fast")["errors"] == 1


# ---------------------------------------------------------------- the real vLLM engine

REAL_TIMEOUT_S = 10.0  # a short answer fits even on a busy 2-core box; the long one below does not
STORY = "Write a very long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def vllm_faults(tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    """phi4_fast on vLLM from a model directory that does not exist (yet), qwen_coder on vLLM (warm, a short
    request timeout), the other experts scripted. Returns the server and phi4_fast's missing directory."""
    tmp = tmp_path_factory.mktemp("vllm-faults")
    missing = tmp / "SmolLM2-135M-Instruct"
    path, config = make_config(tmp, warmup=["qwen_coder"], max_loaded_experts=5)
    for expert in config["experts"]:
        if expert["id"] == "phi4_fast":
            expert["model"] = str(missing)
        elif expert["id"] == "qwen_coder":
            expert["request_timeout_s"] = REAL_TIMEOUT_S
        else:
            expert.update(model="scripted", engine={"kind": "test"})
    server = Server("standard", write_config(path, config), tmp / "standard.log").wait_healthy()
    try:
        server.wait_state("qwen_coder", "ready", timeout=600)
        yield server, missing
    finally:
        server.stop()


def test_real_model_directory_missing_is_a_retryable_503_and_recovers(vllm_faults):
    """vLLM's own error names the missing path; clients and /health get the error without it."""
    server, missing = vllm_faults
    body = {"max_tokens": 8, "temperature": 0}
    error = assert_retryable(chat(server, "phi4_fast", timeout=300, **body), 503, "expert_load_failed")
    assert "phi4_fast" in error["message"]
    health = expert_health(server, "phi4_fast")
    assert health["state"] == "failed" and health["error"]
    stats = server.stats()["experts"]["phi4_fast"]
    assert (stats["load_failures"], stats["loads"]) == (1, 0)

    assert chat(server, "mistral_balanced").status_code == 200  # the other experts still answer
    assert chat(server, "qwen_coder", **body).status_code == 200

    missing.symlink_to(MODEL_DIR)
    recovered = chat(server, "phi4_fast", "What is the capital of France?", timeout=300, **body)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["choices"][0]["message"]["content"].strip()
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}
    stats = server.stats()["experts"]["phi4_fast"]
    assert (stats["load_failures"], stats["loads"]) == (1, 1)


def test_real_generation_past_its_timeout_is_aborted_with_a_retryable_504(vllm_faults):
    """Four samples of a long story at temperature 1 run to 1024 tokens, far past the timeout; the engine must
    drop the request."""
    server, _ = vllm_faults
    started = time.monotonic()
    response = chat(server, "qwen_coder", STORY, n=4, max_tokens=1024, temperature=1.0, seed=5)
    elapsed = time.monotonic() - started
    error = assert_retryable(response, 504, "timeout")
    assert "qwen_coder" in error["message"] and REAL_TIMEOUT_S <= elapsed < REAL_TIMEOUT_S + 5, elapsed
    stats = wait_idle(server, "qwen_coder")  # engine_in_flight back to 0: vLLM aborted the sequences
    assert stats["errors"] >= 1
    assert "did not finish" in expert_health(server, "qwen_coder")["error"]

    recovered = chat(server, "qwen_coder", max_tokens=4, temperature=0)
    assert recovered.status_code == 200, recovered.text
    assert expert_health(server, "qwen_coder") == {"state": "ready", "error": None}


def test_real_engine_sigterm_finishes_the_open_stream_unloads_and_exits_0(tmp_path, start_server):
    """vLLM runs in a thread of the server process: the drain lets it finish the stream, then stops it, and the
    process still exits 0."""
    path, config = make_config(tmp_path, warmup=["qwen_coder"], shutdown_grace_s=60)
    for expert in config["experts"]:
        if expert["id"] != "qwen_coder":
            expert.update(model="scripted", engine={"kind": "test"})
    server = start_server("streaming", write_config(path, config))
    server.wait_state("qwen_coder", "ready", timeout=600)
    body = {"model": "qwen_coder", "messages": [{"role": "user", "content": STORY}], "max_tokens": 48,
            "temperature": 0, "stream": True}
    with requests.post(server.url + CHAT, json=body, stream=True, timeout=120) as response:
        lines = (line for line in response.iter_lines(chunk_size=None) if line)
        first = json.loads(next(lines).removeprefix(b"data: "))  # the stream has started: now the signal
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert rest[-1] == b"data: [DONE]", rest[-3:]
    chunks = [first, *(json.loads(line.removeprefix(b"data: ")) for line in rest[:-1])]
    assert not any("error" in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(chunks) > 2
    code = server.process.wait(60)
    assert code == 0 and time.monotonic() - signalled < 60
    assert "unloaded expert qwen_coder" in server.tail(20)


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(tmp_path, start_server):
    """A full response and a stream, both in flight at SIGTERM, finish whole before the engines are unloaded."""
    server = start_scripted(tmp_path, start_server, {"qwen_coder": {"engine": {"test_token_delay_s": 0.2}}},
                             shutdown_grace_s=10, warmup=["phi4_fast", "qwen_coder"])
    server.wait_state("qwen_coder", "ready", timeout=10)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        full = pool.submit(chat, server, "phi4_fast", "[[sleep=2]] still here")
        stream = pool.submit(chat, server, "qwen_coder", "one two three four five six seven eight", stream=True)
        deadline = time.monotonic() + 5
        while server.stats()["experts"]["qwen_coder"]["active_requests"] + \
                server.stats()["experts"]["phi4_fast"]["active_requests"] < 2:
            assert time.monotonic() < deadline, "the requests never started"
            time.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(15)
        exit_s = time.monotonic() - signalled
        full_response, stream_response = full.result(), stream.result()
    assert full_response.status_code == 200
    assert full_response.json()["choices"][0]["message"]["content"] == "echo: [[sleep=2]] still here"
    events = sse_events(stream_response)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
        "echo: one two three four five six seven eight"
    assert code == 0 and 1.0 < exit_s < 10, (code, exit_s)
    log = server.tail(20)
    assert "unloaded expert phi4_fast" in log and "unloaded expert qwen_coder" in log, log


def test_sigterm_does_not_wait_past_the_grace_period_for_a_hung_request(tmp_path, start_server):
    """A request that never ends must not hold the shutdown past the grace period (an orchestrator would kill -9)."""
    server = start_scripted(tmp_path, start_server, {}, shutdown_grace_s=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hung = pool.submit(chat, server, "phi4_fast", "[[hang]]")
        deadline = time.monotonic() + 5
        while server.stats()["experts"]["phi4_fast"]["active_requests"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        exit_s = time.monotonic() - signalled
        assert hung.exception(5) is not None  # the connection was closed under it
    assert code == 0 and 1.0 <= exit_s < 5, (code, exit_s)  # the 1 s grace, then a moment for the last writes
    assert "unloaded expert phi4_fast" in server.tail(20)


# ---------------------------------------------------------------- access


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 and IPv6 addresses listening on a TCP port, read from /proc/net."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_default_bind_address_is_loopback(tmp_path):
    """With no host in the config and none on the command line, the server listens on 127.0.0.1 only."""
    assert ServerConfig().host == "127.0.0.1" and load_config(EMBEDDED_CONFIG).server.host == "127.0.0.1"
    path, config = make_config(tmp_path, engine="test")
    del config["server"]["host"]
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "servers.standard", "--config",
                                    str(write_config(path, config)), "--port", str(port)],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not listening_addresses(port):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
            assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, in /proc's byte order
            assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
