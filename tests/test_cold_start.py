"""Cold starts on the real engine (issue 24): the standby runner and the eager-first start.

The host keeps one standby process with vLLM imported, which the next start becomes; a compiled runner starts
eager and its compiled twin takes over behind it. Through a streaming front, as a user sees it: all experts
unloaded, one streamed request, the first token within 15 s.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from core.config import load_config
from core.host.protocol import HostAddress
from tests.conftest import Server, alive, make_config, runner_processes

EXPERT = "phi4_fast"
CHAT = "/v1/chat/completions"


def host_states(config: Path) -> dict:
    """The host's own /states, on its unix socket: the fronts do not show the standby."""
    address = HostAddress.for_config(config, load_config(config))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(address.socket))
        sock.sendall(b"GET /states HTTP/1.0\r\nHost: host\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    return json.loads(body)


def wait_standby(config: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        standby = host_states(config)["standby"]
        if standby and standby["ready"]:
            return standby
        time.sleep(0.5)
    raise AssertionError(f"no standby ready after {timeout} s: {host_states(config)['standby']}")


def engine(server: Server) -> dict:
    return server.models()[EXPERT]["engine"]


def wait_compiled(server: Server, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine(server)["effective"]["enforce_eager"] is False:
            return engine(server)
        time.sleep(0.5)
    raise AssertionError(f"the compiled runner did not take over in {timeout} s: {engine(server)}")


def first_token_s(server: Server) -> tuple[float, str]:
    """Seconds from sending a streamed request to its first content, and the whole text."""
    sent = time.monotonic()
    first, text = None, ""
    with requests.post(server.url + CHAT, stream=True, timeout=300, json={
            "model": EXPERT, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]}) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            delta = event["choices"][0]["delta"].get("content") if event["choices"] else None
            if delta:
                first = first or time.monotonic() - sent
                text += delta
    assert first is not None and text, "no content streamed"
    return first, text


@pytest.fixture(scope="module")
def eager_first(tmp_path_factory, real_engine):
    """The embedded config as shipped (compiled, eager first, a standby kept), warm, behind a streaming front."""
    tmp = tmp_path_factory.mktemp("cold")
    path, _ = make_config(tmp, warmup=[EXPERT], eager_first=True, host_linger_s=2)
    server = Server("streaming", path, tmp / "streaming.log").wait_healthy()
    try:
        server.wait_state(EXPERT, "ready", timeout=300)
        yield path, server
    finally:
        server.stop()


def test_an_eager_runner_serves_first_and_its_compiled_twin_takes_over_without_failing_a_request(eager_first):
    path, server = eager_first
    start = engine(server)
    assert start["effective"]["enforce_eager"] is True and start["effective"]["eager_first"] is True
    assert start["log"].endswith("-eager.log")
    eager_pid = start["pid"]
    failures, answered = [], []
    swapped = threading.Event()

    def keep_asking() -> None:  # a request every second or so until the swap, and one more after it
        while True:
            done = swapped.is_set()
            try:
                answered.append(first_token_s(server))
            except AssertionError as error:
                failures.append(str(error))
            if done:
                return
            time.sleep(1.0)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    try:
        compiled = wait_compiled(server)
    finally:
        swapped.set()
        asker.join(120)
    assert not failures, failures
    assert len(answered) >= 2
    assert compiled["pid"] != eager_pid and compiled["last_start"]["compiled_after_s"] > 0
    assert not compiled["log"].endswith("-eager.log")
    deadline = time.monotonic() + 30
    while alive(eager_pid) and time.monotonic() < deadline:  # retired once its requests ended
        time.sleep(0.2)
    assert not alive(eager_pid)


def test_a_cold_start_becomes_the_standby_and_streams_its_first_token_within_15_s(eager_first):
    path, server = eager_first
    wait_compiled(server)
    standby = wait_standby(path)
    assert standby["pid"] in runner_processes(path.parent)  # it dies with the host, as runners do
    assert requests.post(f"{server.url}/admin/experts/{EXPERT}/unload", timeout=120).status_code == 200
    seconds, _ = first_token_s(server)
    start = engine(server)
    assert start["pid"] == standby["pid"], (start, standby)
    assert start["last_start"]["from_standby"] is True
    assert start["last_start"]["phases_s"]["imports"] < 2.0, start["last_start"]
    assert seconds < 15.0, (seconds, start["last_start"])
    compiled = wait_compiled(server)  # and it is compiled behind, as at the first start
    assert compiled["pid"] != standby["pid"]
    assert wait_standby(path)["pid"] != standby["pid"]  # a new standby for the next start


def test_a_standby_that_died_is_replaced_by_a_plain_start(eager_first):
    path, server = eager_first
    standby = wait_standby(path)
    os.kill(standby["pid"], signal.SIGKILL)
    assert requests.post(f"{server.url}/admin/experts/{EXPERT}/unload", timeout=120).status_code == 200
    seconds, text = first_token_s(server)
    start = engine(server)
    assert start["pid"] != standby["pid"] and start["last_start"]["from_standby"] is False
    assert start["last_start"]["phases_s"]["imports"] > 2.0  # the imports were done again
