"""Faults stay contained: an upstream that fails while generating, a load that fails, an upstream that hangs past
the expert's timeout, a runner that dies. Each gives the affected requests a clear error (retryable ones are 503/504
with Retry-After) while the other experts keep answering. Each shows in /health and /stats, and the expert recovers
on a later request. SIGTERM lets in-flight requests finish and exits 0; the model host then stops once no front is
attached. The servers bind to loopback unless told otherwise, and no error message carries a stack trace or a file
path.

The fault paths run on the fake upstream, whose faults are exact. The real vLLM runner covers what only it can
show: a model directory that does not exist, a generation aborted at its timeout, a runner that dies, and shutdown
with a live runner.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from core.config import EMBEDDED_CONFIG, ServerConfig, load_config
from core.host.protocol import HostAddress
from tests.conftest import (FAKE_MODELS, FLOAT32_DIR, REPO, FakeUpstream, Server, alive, fake_engine, free_port,
                            host_pids, make_config, runner_metrics, write_config)

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


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    """An error in OpenAI's shape: the status, the code, a clean message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert_clean(error["message"])
    return error


def assert_retryable(response: requests.Response, status: int, code: str) -> dict:
    """A retryable error: as above, with a Retry-After of at least a second."""
    error = assert_error(response, status, code)
    assert int(response.headers["Retry-After"]) >= 1
    return error


def expert_health(server: Server, expert: str) -> dict:
    """The expert's state and error in /health (its precision is checked in test_quality_gate)."""
    health = server.health()["experts"][expert]
    assert_clean(health["error"])
    return {"state": health["state"], "error": health["error"]}


def wait_health(server: Server, expert: str, check: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    """The expert's /health entry once `check` holds: a front reports a request's outcome to the host just after
    answering it."""
    deadline = time.monotonic() + timeout
    while True:
        health = expert_health(server, expert)
        if check(health):
            return health
        assert time.monotonic() < deadline, f"{expert}: {health}"
        time.sleep(0.05)


def wait_idle(server: Server, expert: str, timeout: float = 10.0) -> dict:
    """The expert's /stats once nothing is left running on it: no lease, no queued request, no open stream."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        mine = stats["experts"][expert]
        if (mine["active_requests"], mine["queued_requests"], stats["active_streams"]) == (0, 0, 0):
            return mine
        assert time.monotonic() < deadline, f"{expert} still busy: {mine}"
        time.sleep(0.1)


def sse_events(response: requests.Response) -> list:
    """The events of a finished SSE response: decoded chunks, and "[DONE]" as a string."""
    assert response.headers["Content-Type"] == "text/event-stream"
    return parse_sse(response.content.decode("utf-8"))


def parse_sse(text: str) -> list:
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1]), [b[:200] for b in blocks[-3:]]
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


def start_fake(tmp_path: Path, start_server, upstream: FakeUpstream, experts: dict[str, dict],
               **server_options) -> Server:
    """A standard server whose experts are the fake upstream's "echo"; `experts` maps an id to its overrides
    (another of the upstream's models under "remote_model")."""
    path, config = make_config(tmp_path, engine="fake", upstream=upstream.url, **server_options)
    for index, expert in enumerate(config["experts"]):
        overrides = dict(experts.get(expert["id"], {}))
        if "remote_model" in overrides:
            fake_engine(config, index, overrides.pop("remote_model"))
        expert.update(overrides)
    return start_server("standard", write_config(path, config))


@pytest.fixture
def own_upstream() -> Iterator[Callable[..., FakeUpstream]]:
    """Fake upstreams of one test's own, killed at its end: a hung request would hold a graceful stop (and the
    session's shared fake) for a minute."""
    started: list[FakeUpstream] = []

    def start(*models: str) -> FakeUpstream:
        upstream = FakeUpstream(models=models or FAKE_MODELS)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.process.kill()
        upstream.process.wait()


def host_log(config: Path) -> str:
    return HostAddress.for_config(config, load_config(config)).log.read_text(errors="replace")


def assert_host_stops(config: Path, timeout: float = 30.0) -> str:
    """Once no front is attached, the host lingers host_linger_s, stops its runners and exits; returns its log."""
    deadline = time.monotonic() + timeout
    while host_pids(config):
        assert time.monotonic() < deadline, f"the model host still runs:\n{host_log(config)[-3000:]}"
        time.sleep(0.2)
    log = host_log(config)
    assert "model host stopped" in log, log[-3000:]
    return log


# ---------------------------------------------------------------- an upstream that fails while generating


def test_upstream_failure_is_an_error_for_that_expert_only(tmp_path, start_server, fake_upstream):
    """An upstream whose every answer fails: its expert answers 502 (an error event once a stream has begun),
    /health and /stats say so, and the other experts are untouched."""
    server = start_fake(tmp_path, start_server, fake_upstream, {"mistral_balanced": {"remote_model": "echo[[fail]]"}})
    assert chat(server, "phi4_fast").status_code == 200

    error = assert_error(chat(server, "mistral_balanced"), 502, "upstream_error")
    assert "mistral_balanced" in error["message"] and "scripted failure" in error["message"]
    assert error["type"] == "server_error"
    streamed = chat(server, "mistral_balanced", "one two three", stream=True)
    assert streamed.status_code == 200  # the upstream's first token went out before it failed
    events = sse_events(streamed)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["content"] == "echo:"
    event_error = events[-2]["error"]
    assert event_error["code"] == "upstream_error" and "scripted failure" in event_error["message"]
    assert_clean(event_error["message"])
    assert not any("error" in e for e in events[:-2])

    health = wait_health(server, "mistral_balanced", lambda h: h["error"] is not None)
    assert health["state"] == "ready" and "scripted failure" in health["error"]  # it loaded; it fails answering
    assert chat(server, "phi4_fast").status_code == 200  # the other experts are untouched
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}
    stats = server.stats()
    assert (stats["experts"]["mistral_balanced"]["errors"], stats["experts"]["mistral_balanced"]["requests"]) == (2, 2)
    assert (stats["experts"]["phi4_fast"]["errors"], stats["experts"]["phi4_fast"]["requests"]) == (0, 2)
    assert stats["http_errors"] == {"502": 2}  # the error event after the 200 counts too
    wait_idle(server, "mistral_balanced")


def test_a_failed_request_clears_on_the_next_success_and_503_is_retryable(tmp_path, start_server, fake_upstream):
    """One failed request shows in /health until the next success; an upstream's 503 is a retryable 503."""
    server = start_fake(tmp_path, start_server, fake_upstream, {})
    assert_error(chat(server, "phi4_fast", "a [[fail]] b"), 502, "upstream_error")
    assert "scripted failure" in wait_health(server, "phi4_fast", lambda h: h["error"] is not None)["error"]

    recovered = chat(server, "phi4_fast")
    assert recovered.status_code == 200 and recovered.json()["choices"][0]["message"]["content"] == "echo: hello there"
    assert wait_health(server, "phi4_fast", lambda h: h["error"] is None) == {"state": "ready", "error": None}

    error = assert_retryable(chat(server, "qwen_coder", "busy [[status=503]]"), 503, "upstream_unavailable")
    assert "qwen_coder" in error["message"] and error["type"] == "service_unavailable_error"
    assert chat(server, "qwen_coder").status_code == 200
    stats = wait_idle(server, "phi4_fast")
    assert (stats["errors"], stats["requests"]) == (1, 2)


# ---------------------------------------------------------------- a load that fails


def test_load_failure_is_a_retryable_503_for_that_expert_and_is_retried(tmp_path, start_server, fake_upstream):
    """An upstream that does not serve the expert's model: the expert fails to load, a request during the backoff
    is told when to come back without a new attempt, the next one after it tries again, and the others load and
    answer."""
    server = start_fake(tmp_path, start_server, fake_upstream, {"qwen_coder": {"remote_model": "echo[[missing]]"}},
                        restart_backoff_s=2.0)
    failed = chat(server, "qwen_coder")
    error = assert_retryable(failed, 503, "expert_load_failed")
    assert "qwen_coder" in error["message"] and "does not serve the model 'echo[[missing]]'" in error["message"]
    health = expert_health(server, "qwen_coder")
    assert health["state"] == "failed" and "echo[[missing]]" in health["error"]
    stats = server.stats()["experts"]["qwen_coder"]
    assert (stats["loads"], stats["load_failures"]) == (0, 1)

    assert chat(server, "phi4_fast").status_code == 200  # the other experts load and answer
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}

    assert_retryable(chat(server, "qwen_coder"), 503, "restart_backoff")  # within the backoff: no new attempt
    assert server.stats()["experts"]["qwen_coder"]["load_failures"] == 1
    time.sleep(int(failed.headers["Retry-After"]))
    again = chat(server, "qwen_coder")
    assert_retryable(again, 503, "expert_load_failed")  # after it, the next request loads again
    assert int(again.headers["Retry-After"]) >= 4  # and the backoff doubled
    stats = server.stats()["experts"]
    assert (stats["qwen_coder"]["loads"], stats["qwen_coder"]["load_failures"]) == (0, 2)
    assert (stats["phi4_fast"]["loads"], stats["phi4_fast"]["load_failures"]) == (1, 0)
    assert stats["qwen_coder"]["requests"] == stats["qwen_coder"]["errors"] == 3
    assert server.stats()["http_errors"] == {"503": 3}


# ---------------------------------------------------------------- an upstream hung past the expert's timeout


def test_hung_upstream_is_a_retryable_504_at_its_timeout_while_others_answer(tmp_path, start_server, own_upstream):
    """A hang costs its caller the timeout and nothing more: the request's lease is given back, not left holding a
    slot, and the other experts answer meanwhile."""
    server = start_fake(tmp_path, start_server, own_upstream(), {
        "qwen_coder": {"request_timeout_s": 2, "remote_model": "echo[[hang]]"},
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
    stats = wait_idle(server, "qwen_coder")  # the hung requests gave their slots back
    assert stats["errors"] == 2 and stats["requests"] == 2
    health = wait_health(server, "qwen_coder", lambda h: h["error"] is not None)
    assert health["state"] == "ready" and "did not finish" in health["error"]

    assert_retryable(chat(server, "phi4_fast", "[[hang]] once"), 504, "timeout")  # one request hangs ...
    assert "did not finish" in wait_health(server, "phi4_fast", lambda h: h["error"] is not None)["error"]
    assert chat(server, "phi4_fast").status_code == 200  # ... and the next one is answered again
    assert wait_health(server, "phi4_fast", lambda h: h["error"] is None) == {"state": "ready", "error": None}
    assert server.stats()["http_errors"] == {"504": 3}


def test_timeout_in_mid_stream_ends_the_stream_with_an_error_event(tmp_path, start_server, fake_upstream):
    """Once chunks have gone out the status is already 200, so the timeout can only be told in the stream."""
    server = start_fake(tmp_path, start_server, fake_upstream, {"phi4_fast": {"request_timeout_s": 1}})
    response = chat(server, "phi4_fast", "[[delay=0.3]] " + " ".join(["word"] * 12), stream=True)
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error"
    assert_clean(error["message"])
    assert 1 <= len(events[:-2]) < 12  # some tokens arrived before the deadline, not all
    assert wait_idle(server, "phi4_fast")["errors"] == 1
    assert server.stats()["http_errors"] == {"504": 1}


def read_slowly(port: int, body: dict, pause_s: float) -> tuple[bytes, bytes]:
    """A streamed request from a client that reads nothing for `pause_s`, then reads the rest: the head and the
    de-chunked body. A small receive buffer, so that the server's writes soon wait for the client."""
    payload = json.dumps(body).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        time.sleep(pause_s)
        received = []
        while chunk := sock.recv(1 << 16):
            received.append(chunk)
    head, _, rest = b"".join(received).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        rest = rest[size + 2:]
    return head, b"".join(chunks)


def test_timeout_while_a_slow_client_reads_still_ends_with_an_error_event(tmp_path, start_server, own_upstream):
    """The request deadline counts the time spent waiting for the upstream, never the time a chunk spends with the
    client. A slow client holds the server's writes (each token is megabytes here) past the deadline; the next wait
    for the upstream then times out, and the stream ends with a timeout event and [DONE], never cut silently, and
    the expert's /stats count an error, not a success."""
    upstream = own_upstream("echo", "echo[[delay=0.5]]")
    server = start_fake(tmp_path, start_server, upstream,
                        {"phi4_fast": {"request_timeout_s": 2, "remote_model": "echo[[delay=0.5]]"}})
    words = " ".join(["x" * 150_000] * 6 + ["word"] * 20)  # 16 choices: 2.4 MB a token for the big words
    body = {"model": "phi4_fast", "stream": True, "n": 16, "max_tokens": 64,
            "messages": [{"role": "user", "content": words}]}
    head, data = read_slowly(server.port, body, pause_s=4.0)
    assert head.startswith(b"HTTP/1.1 200"), head
    events = parse_sse(data.decode())
    assert events[-1] == "[DONE]", "the stream was cut without an error event"
    error = events[-2]["error"]
    assert (error["code"], error["type"]) == ("timeout", "timeout_error"), error
    assert "phi4_fast" in error["message"]
    assert_clean(error["message"])
    chunks = events[:-2]
    assert chunks and not any("error" in e for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["content"] == "echo:"
    assert not any(c["choices"][0]["finish_reason"] for c in chunks)  # cut short by the deadline

    stats = wait_idle(server, "phi4_fast")
    assert stats["errors"] >= 1 and stats["errors"] == stats["requests"] == 1, stats
    assert server.stats()["http_errors"] == {"504": 1}
    deadline = time.monotonic() + 10  # and the upstream stream was closed
    while upstream.open_streams():
        assert time.monotonic() < deadline, "the upstream stream is still open"
        time.sleep(0.1)


# ---------------------------------------------------------------- the real vLLM runner

REAL_TIMEOUT_S = 10.0  # a short answer fits even on a busy 2-core box; the long one below does not
STORY = "Write a very long story about a lighthouse keeper and the sea."


def runner_requests(server: Server, expert: str) -> float:
    """Requests running or waiting in the expert's vLLM runner, from the runner's own /metrics."""
    text = runner_metrics(server, expert)
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"))


@pytest.fixture(scope="module")
def vllm_faults(tmp_path_factory, fake_upstream, real_engine) -> Iterator[tuple[Server, Path]]:
    """phi4_fast on vLLM from a model directory that does not exist (yet), qwen_coder on vLLM (warm, a short
    request timeout), the other experts on the fake upstream. Returns the server and phi4_fast's missing
    directory. Float32 and eager: these are tests of runner processes, and an eager start skips compilation."""
    tmp = tmp_path_factory.mktemp("vllm-faults")
    missing = tmp / "SmolLM2-135M-Instruct"
    path, config = make_config(tmp, engine="float32-eager", warmup=["qwen_coder"], max_loaded_experts=5)
    for expert in config["experts"]:
        if expert["id"] == "phi4_fast":
            expert["model"] = str(missing)
        elif expert["id"] == "qwen_coder":
            expert["request_timeout_s"] = REAL_TIMEOUT_S
        else:
            expert.update(model="echo", engine={"kind": "remote", "base_url": fake_upstream.url,
                                                "remote_model": "echo"})
    server = Server("standard", write_config(path, config), tmp / "standard.log").wait_healthy()
    try:
        server.wait_state("qwen_coder", "ready", timeout=600)
        yield server, missing
    finally:
        server.stop()


def test_real_model_directory_missing_is_a_retryable_503_and_recovers(vllm_faults):
    """Found before vLLM is started (it would import for seconds, then take the path for a hub repo id): clients
    and /health get the folder's name, the host's log its whole path."""
    server, missing = vllm_faults
    body = {"max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    error = assert_retryable(chat(server, "phi4_fast", timeout=300, **body), 503, "expert_load_failed")
    assert time.monotonic() - started < 5
    assert "phi4_fast" in error["message"] and f"model folder '{missing.name}' does not exist" in error["message"]
    assert str(missing.parent) not in error["message"]
    health = expert_health(server, "phi4_fast")
    assert health["state"] == "failed" and "does not exist" in health["error"]
    stats = server.stats()["experts"]["phi4_fast"]
    assert (stats["load_failures"], stats["loads"]) == (1, 0)

    assert chat(server, "mistral_balanced").status_code == 200  # the other experts still answer
    assert chat(server, "qwen_coder", **body).status_code == 200

    missing.symlink_to(FLOAT32_DIR)
    time.sleep(1.0)  # the first retry backoff (restart_backoff_s)
    recovered = chat(server, "phi4_fast", "What is the capital of France?", timeout=300, **body)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["choices"][0]["message"]["content"].strip()
    assert expert_health(server, "phi4_fast") == {"state": "ready", "error": None}
    stats = server.stats()["experts"]["phi4_fast"]
    assert (stats["load_failures"], stats["loads"]) == (1, 1)


def test_real_generation_past_its_timeout_is_aborted_with_a_retryable_504(vllm_faults):
    """Four samples of a long story at temperature 1 run to 1024 tokens, far past the timeout; the runner must
    drop the request (the front closes its connection, which vLLM takes as an abort)."""
    server, _ = vllm_faults
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, server, "qwen_coder", STORY, n=4, max_tokens=1024, temperature=1.0, seed=5)
        while not runner_requests(server, "qwen_coder"):  # the runner's own gauge sees the request first
            assert not pending.done(), pending.result().text
            time.sleep(0.1)
        response = pending.result()
    elapsed = time.monotonic() - started
    error = assert_retryable(response, 504, "timeout")
    assert "qwen_coder" in error["message"] and REAL_TIMEOUT_S <= elapsed < REAL_TIMEOUT_S + 5, elapsed
    stats = wait_idle(server, "qwen_coder")
    assert stats["errors"] >= 1
    deadline = time.monotonic() + 10
    while runner_requests(server, "qwen_coder"):  # vLLM aborted the sequences
        assert time.monotonic() < deadline, "the runner still generates the timed-out request"
        time.sleep(0.2)
    assert "did not finish" in wait_health(server, "qwen_coder", lambda h: h["error"] is not None)["error"]

    recovered = chat(server, "qwen_coder", max_tokens=4, temperature=0)
    assert recovered.status_code == 200, recovered.text
    assert wait_health(server, "qwen_coder", lambda h: h["error"] is None) == {"state": "ready", "error": None}


def test_real_runner_that_dies_is_a_retryable_503_and_is_restarted(vllm_faults):
    """A runner killed in the middle of a request: that request gets a retryable 503, the host restarts the runner
    (it is in the warm pool), the other experts keep answering, and the expert answers again."""
    server, _ = vllm_faults
    pid = server.runner_pid("qwen_coder")
    assert pid and alive(pid)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, server, "qwen_coder", STORY, max_tokens=256, temperature=0, timeout=120)
        deadline = time.monotonic() + 30
        while server.stats()["experts"]["qwen_coder"]["active_requests"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        response = pending.result()
    assert_retryable(response, 503, "engine_failed")
    assert chat(server, "mistral_balanced").status_code == 200
    server.wait_state("qwen_coder", "ready", timeout=600)
    new_pid = server.runner_pid("qwen_coder")
    assert new_pid and new_pid != pid and not alive(pid)
    recovered = chat(server, "qwen_coder", max_tokens=4, temperature=0, timeout=300)
    assert recovered.status_code == 200, recovered.text
    assert wait_health(server, "qwen_coder", lambda h: h["error"] is None) == {"state": "ready", "error": None}


def test_real_engine_sigterm_finishes_the_open_stream_then_the_host_stops_the_runner(tmp_path, start_server,
                                                                                      fake_upstream, real_engine):
    """The drain lets the runner finish the stream and the front exits 0; once no front is attached, the host
    stops the runner (its whole process group) and exits."""
    path, config = make_config(tmp_path, engine="float32-eager", warmup=["qwen_coder"], shutdown_grace_s=60)
    for expert in config["experts"]:
        if expert["id"] != "qwen_coder":
            expert.update(model="echo", engine={"kind": "remote", "base_url": fake_upstream.url,
                                                "remote_model": "echo"})
    server = start_server("streaming", write_config(path, config))
    server.wait_state("qwen_coder", "ready", timeout=600)
    runner = server.runner_pid("qwen_coder")
    assert runner and alive(runner)
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
    log = assert_host_stops(path, timeout=60)
    assert "stopped runner" in log and not alive(runner)


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(tmp_path, start_server, fake_upstream):
    """A full response and a stream, both in flight at SIGTERM, finish whole; the front exits 0, and the model
    host stops once no front is attached."""
    server = start_fake(tmp_path, start_server, fake_upstream, {}, shutdown_grace_s=10,
                        warmup=["phi4_fast", "qwen_coder"])
    server.wait_state("qwen_coder", "ready", timeout=10)
    words = "[[delay=0.2]] one two three four five six seven eight"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        full = pool.submit(chat, server, "phi4_fast", "[[sleep=2]] still here")
        stream = pool.submit(chat, server, "qwen_coder", words, stream=True)
        deadline = time.monotonic() + 5
        while sum(e["active_requests"] for e in server.stats()["experts"].values()) < 2:
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
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == \
        "echo: " + words
    assert code == 0 and 1.0 < exit_s < 10, (code, exit_s)
    assert_host_stops(server.config, timeout=15)


def test_sigterm_does_not_wait_past_the_grace_period_for_a_hung_request(tmp_path, start_server, own_upstream):
    """A request that never ends must not hold the shutdown past the grace period (an orchestrator would kill -9)."""
    server = start_fake(tmp_path, start_server, own_upstream(), {}, shutdown_grace_s=1)
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
    assert_host_stops(server.config, timeout=15)


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


def test_default_bind_address_is_loopback(tmp_path, fake_upstream):
    """With no host in the config and none on the command line, the server listens on 127.0.0.1 only."""
    assert ServerConfig().host == "127.0.0.1" and load_config(EMBEDDED_CONFIG).server.host == "127.0.0.1"
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
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
