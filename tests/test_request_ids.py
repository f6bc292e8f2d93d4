"""Request ids: every response of every front carries `X-Request-Id` (answers, streams, and every error: the
router's 404/405, the auth layer's 401, 400/413 from parsing); a client's own printable id of at most 128
characters is echoed, anything else is replaced by a new one; and each request leaves one access log line with its
method, path, status, expert, tokens, duration and id.

Real fronts of each kind on the fake upstream, over real sockets; the log is the server's own output.
"""
from __future__ import annotations

import re
import time
import uuid

import pytest
import requests

from tests.conftest import Server, make_config

KINDS = ("standard", "streaming", "consensus")
CHAT = "/v1/chat/completions"
GENERATED = re.compile(r"^[0-9a-f]{32}$")
KEY = "id-test-key"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, fake_upstream):
    """One front of each kind with an API key (so the auth layer has errors to give) and a small body limit."""
    tmp = tmp_path_factory.mktemp("ids")
    path, _ = make_config(tmp, engine="fake", upstream=fake_upstream.url, max_body_bytes=4096)
    started = {kind: Server(kind, path, tmp / f"{kind}.log", env={"CAPIBARA_API_KEY": KEY}) for kind in KINDS}
    try:
        yield {kind: server.wait_healthy() for kind, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hello there"}]


def cases(url: str) -> list[tuple[str, int, dict]]:
    """(label, expected status, requests.request arguments) for each kind of answer a front gives."""
    return [
        ("answer", 200, {"method": "POST", "url": url + CHAT, "headers": AUTH,
                         "json": {"model": "phi4_fast", "messages": USER}}),
        ("stream", 200, {"method": "POST", "url": url + CHAT, "headers": AUTH,
                         "json": {"model": "phi4_fast", "messages": USER, "stream": True}}),
        ("health", 200, {"method": "GET", "url": url + "/health"}),
        ("metrics", 200, {"method": "GET", "url": url + "/metrics", "headers": AUTH}),
        ("bad json", 400, {"method": "POST", "url": url + CHAT, "headers": AUTH, "data": b"{nope"}),
        ("too large", 413, {"method": "POST", "url": url + CHAT, "headers": AUTH, "data": b"x" * 8192}),
        ("no key", 401, {"method": "POST", "url": url + CHAT, "json": {"messages": USER}}),
        ("no route", 404, {"method": "GET", "url": url + "/nowhere", "headers": AUTH}),
        ("wrong method", 405, {"method": "GET", "url": url + CHAT, "headers": AUTH}),
        ("unknown model", 404, {"method": "POST", "url": url + CHAT, "headers": AUTH,
                                "json": {"model": "nope", "messages": USER}}),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_every_response_carries_the_clients_id_or_a_new_one(kind, servers):
    server = servers[kind]
    for label, status, request in cases(server.url):
        own = f"client-{kind}-{uuid.uuid4().hex}"
        echoed = requests.request(**{**request, "headers": {**request.get("headers", {}), "X-Request-Id": own}},
                                  timeout=30)
        assert echoed.status_code == status, (label, echoed.text)
        assert echoed.headers.get("X-Request-Id") == own, (label, dict(echoed.headers))
        made = [requests.request(**request, timeout=30).headers.get("X-Request-Id") for _ in range(2)]
        assert all(made) and all(GENERATED.match(m) for m in made) and made[0] != made[1], (label, made)


@pytest.mark.parametrize("bad", ["x" * 129, "has a space", "caf\u00e9", ""])
def test_an_id_that_is_not_printable_or_too_long_is_replaced(bad, servers):
    response = requests.get(servers["standard"].url + "/health", headers={"X-Request-Id": bad.encode("latin-1")},
                            timeout=10)
    assert response.status_code == 200 and GENERATED.match(response.headers["X-Request-Id"]), response.headers
    longest = "y" * 128
    assert requests.get(servers["standard"].url + "/health", headers={"X-Request-Id": longest},
                        timeout=10).headers["X-Request-Id"] == longest


@pytest.mark.parametrize("kind", KINDS)
def test_the_clients_id_reaches_the_upstream(kind, servers, fake_upstream):
    """The id travels on to the runner (vLLM logs it with --enable-log-requests), streamed or not."""
    for stream in (False, True):
        own = f"upstream-{kind}-{uuid.uuid4().hex}"
        answer = requests.post(servers[kind].url + CHAT, headers={**AUTH, "X-Request-Id": own}, timeout=30,
                               json={"model": "phi4_fast", "messages": USER, "stream": stream})
        assert answer.status_code == 200, answer.text
        seen = requests.get(fake_upstream.url + "/_requests", timeout=10).json()["requests"]
        assert [r["request_id"] for r in seen if r["request_id"] == own] == [own], (stream, seen[-3:])


def log_lines(server: Server, request_id: str, timeout: float = 5.0) -> list[str]:
    """The server's access log lines for one id (the line is written once the answer is out)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.tail(2000).splitlines() if line.endswith(f" id={request_id}")]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_one_access_log_line_per_request(kind, servers):
    server = servers[kind]
    answered, streamed, refused = (f"{label}-{uuid.uuid4().hex}" for label in ("answered", "streamed", "refused"))
    answer = requests.post(server.url + CHAT, headers={**AUTH, "X-Request-Id": answered}, timeout=30,
                           json={"model": "qwen_coder", "messages": USER})
    usage = answer.json()["usage"]
    requests.post(server.url + CHAT, headers={**AUTH, "X-Request-Id": streamed}, timeout=30,
                  json={"model": "phi4_fast", "messages": USER, "stream": True}).content
    requests.get(server.url + "/nowhere?secret=1", headers={"X-Request-Id": refused}, timeout=10)
    [line] = log_lines(server, answered)
    assert re.search(rf"capibara6\.access: POST /v1/chat/completions 200 expert=qwen_coder "
                     rf"tokens={usage['prompt_tokens']}\+{usage['completion_tokens']} \d+\.\d{{3}}s id={answered}$",
                     line), line
    [line] = log_lines(server, streamed)
    assert re.search(r"POST /v1/chat/completions 200 expert=phi4_fast tokens=[1-9]\d*\+[1-9]\d* ", line), line
    [line] = log_lines(server, refused)
    assert re.search(r"GET /nowhere 401 expert=- tokens=0\+0 \d+\.\d{3}s ", line), line  # no query string logged
