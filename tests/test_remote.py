"""Remote experts: a front server relays some experts to an upstream OpenAI-compatible server over real sockets.

The upstream is the fake upstream (tests/fake_upstream.py: its answers, delays and faults are known), in one
test the real vLLM engine behind our own standard server. `core.upstream.Upstream`, the one client for every
upstream, is tested on its own against the fake upstream: what it sends, what it returns, and how it names each
way an upstream can fail; the front's tests check the statuses clients get for those failures.
"""
import asyncio
import json
import socket
import time

import openai
import pytest
import requests

from core.config import load_config
from core.host.protocol import HostAddress
from core.protocol import ChatMessage
from core.router import Router
from core.upstream import Failure, Upstream, UpstreamError
from tests.conftest import EMBEDDED, FAKE_MODELS, REPO, FakeUpstream, Server, free_port, make_config, write_config

KEY = "k3y-for-the-upstream-9f2c"
WRONG_KEY = "not-the-key-41b7"
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
ECHO = "echo: " + PROMPT
SYSTEM = {e["id"]: e["system_prompt"] for e in EMBEDDED["experts"]}
SAMPLING = {e["id"]: e["sampling"] for e in EMBEDDED["experts"]}


def remote(config: dict, expert_id: str, base_url: str, remote_model: str = "echo", **options) -> None:
    """Turn one expert of a test config into a remote expert of `base_url`."""
    expert = next(e for e in config["experts"] if e["id"] == expert_id)
    expert["engine"] = {"kind": "remote", "base_url": base_url, "remote_model": remote_model, **options}


def chat(server, timeout: float = 30, **body) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=timeout)


def wait_idle(server, expert: str, timeout: float = 5.0) -> dict:
    """The expert's /stats once it holds no lease and no stream (or as it is at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()["experts"][expert]
        if (stats["active_requests"], stats["active_streams"]) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def wait_closed(upstream: FakeUpstream, timeout: float = 10.0) -> None:
    """Until the upstream has no stream open: the front closed its connection."""
    deadline = time.monotonic() + timeout
    while upstream.open_streams():
        assert time.monotonic() < deadline, "the upstream stream is still open"
        time.sleep(0.05)


def sse_events(response: requests.Response) -> list:
    assert response.headers["Content-Type"] == "text/event-stream"
    blocks = response.content.decode().split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1]), blocks[-3:]
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


@pytest.fixture(scope="module")
def keyed():
    """A fake upstream that requires KEY."""
    upstream = FakeUpstream(api_key=KEY)
    yield upstream
    upstream.process.kill()  # requests that hang or sleep would hold a graceful stop
    upstream.process.wait()


# ---------------------------------------------------------------- a front with experts on two upstreams


@pytest.fixture(scope="module")
def pair(tmp_path_factory, keyed, fake_upstream):
    """A front whose experts are: phi4_fast and qwen_coder on the keyed upstream (with the key), mistral_balanced
    (vision) on the session's fake upstream without a key, gemma3_multimodal on the keyed upstream with a wrong
    key, aya on the keyed upstream asking for a model it does not serve."""
    tmp = tmp_path_factory.mktemp("remote")
    path, config = make_config(tmp, engine="fake", upstream=fake_upstream.url, name="front.json")
    remote(config, "phi4_fast", keyed.url, api_key_env="UPSTREAM_KEY")
    remote(config, "qwen_coder", keyed.url + "/v1/", api_key_env="UPSTREAM_KEY")
    remote(config, "gemma3_multimodal", keyed.url, api_key_env="WRONG_UPSTREAM_KEY")
    remote(config, "aya_expanse_multilingual", keyed.url, "no_such_model", api_key_env="UPSTREAM_KEY")
    next(e for e in config["experts"] if e["id"] == "mistral_balanced")["vision"] = True
    front = Server("standard", write_config(path, config), tmp / "front.log",
                   {"UPSTREAM_KEY": KEY, "WRONG_UPSTREAM_KEY": WRONG_KEY})
    front.wait_healthy()
    try:
        yield front, keyed
    finally:
        front.stop()


def upstream_chat(upstream: FakeUpstream, expert: str, **body) -> dict:
    """The upstream's own answer to what the front sends it: the expert's system prompt, then the messages."""
    messages = [{"role": "system", "content": SYSTEM[expert]}, *MESSAGES]
    response = requests.post(upstream.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": "echo", "messages": messages, **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def last_forwarded(upstream: FakeUpstream) -> dict:
    return upstream.requests()[-1]["body"]


def test_full_response_is_the_upstream_answer(pair):
    front, upstream = pair
    response = chat(front, model="phi4_fast")
    assert response.status_code == 200, response.text
    body = response.json()
    sent = last_forwarded(upstream)
    direct = upstream_chat(upstream, "phi4_fast")
    assert body["model"] == response.headers["X-Capibara-Expert"] == "phi4_fast"
    assert body["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"] == ECHO
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == direct["usage"] and body["usage"]["prompt_tokens"] > len(PROMPT.split())
    # what the front sent: the upstream's model name, the expert's system prompt and sampling defaults
    assert sent["model"] == "echo" and sent["stream"] is False
    assert sent["messages"] == [{"role": "system", "content": SYSTEM["phi4_fast"]}, *MESSAGES]
    defaults = SAMPLING["phi4_fast"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == \
        (defaults["temperature"], defaults["top_p"], defaults["max_tokens"])

    two = chat(front, model="qwen_coder", n=2, max_tokens=3).json()  # base_url given as .../v1/ works too
    assert [c["message"]["content"] for c in two["choices"]] == ["echo: What is"] * 2
    assert [c["finish_reason"] for c in two["choices"]] == ["length"] * 2
    assert two["usage"]["completion_tokens"] == 6


def test_stream_through_the_openai_client(pair):
    front, upstream = pair
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    full = client.chat.completions.create(model="phi4_fast", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="phi4_fast", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ECHO
    assert len(content) == len(ECHO.split())  # token by token, as the upstream sent them
    assert content[0].choices[0].delta.role == "assistant" and content[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.model == "phi4_fast" for c in chunks)
    assert last_forwarded(upstream)["stream_options"]["include_usage"] is True


def test_text_completions(pair):
    front, upstream = pair
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    full = client.completions.create(model="phi4_fast", prompt="one two three", max_tokens=3)
    assert full.choices[0].text == "echo: one two" and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (3, 3)
    chunks = list(client.completions.create(model="phi4_fast", prompt="one two", n=2, stream=True))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: "echo: one two", 1: "echo: one two"}
    client.completions.create(model="phi4_fast", prompt=["one two", "three"], max_tokens=2)
    sent = last_forwarded(upstream)
    assert sent["prompt"] == ["one two", "three"] and sent["model"] == "echo" and "messages" not in sent


def test_sampling_fields_pass_through_and_neutral_ones_are_left_out(pair):
    front, upstream = pair
    assert chat(front, model="phi4_fast").status_code == 200
    assert not {"top_k", "seed", "stop", "repetition_penalty"} & set(last_forwarded(upstream))
    assert chat(front, model="phi4_fast", top_k=5, seed=3, stop=["x"], repetition_penalty=1.1,
                max_tokens=4).status_code == 200
    sent = last_forwarded(upstream)
    assert (sent["top_k"], sent["seed"], sent["stop"], sent["repetition_penalty"], sent["max_tokens"]) == \
        (5, 3, ["x"], 1.1, 4)


def test_images_stay_in_the_last_user_turn(pair, fake_upstream):
    front, _ = pair
    image = "data:image/png;base64,iVBORw0KGgo="
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": image}}]}]
    response = chat(front, model="mistral_balanced", messages=messages)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: what is this"
    assert last_forwarded(fake_upstream)["messages"] == messages


def test_experts_on_two_upstreams_side_by_side(pair, fake_upstream):
    front, upstream = pair
    before = len(upstream.requests())
    assert chat(front, model="mistral_balanced").json()["choices"][0]["message"]["content"] == ECHO
    assert last_forwarded(fake_upstream)["messages"][-1] == MESSAGES[0]
    assert chat(front, model="phi4_fast").status_code == 200
    assert chat(front, model="qwen_coder").status_code == 200
    assert len(upstream.requests()) == before + 2  # only the keyed upstream's experts went there
    models = front.models()
    assert models["mistral_balanced"]["engine"]["base_url"] == fake_upstream.url
    engine = models["qwen_coder"]["engine"]
    assert engine["kind"] == "remote" and engine["base_url"] == upstream.url
    assert engine["effective"] == {"base_url": upstream.url, "remote_model": "echo", "api_key_env": "UPSTREAM_KEY"}
    assert engine["pid"] is None and models["qwen_coder"]["state"] == "ready"
    assert engine["key"] != models["phi4_fast"]["engine"]["key"] != models["mistral_balanced"]["engine"]["key"]
    stats = front.stats()["experts"]
    assert stats["phi4_fast"]["requests"] >= 1 and stats["phi4_fast"]["completion_tokens"] > 0
    assert stats["mistral_balanced"]["requests"] >= 1


def test_failed_loads_name_the_cause_never_the_key(pair):
    front, _ = pair
    unknown = chat(front, model="aya_expanse_multilingual")
    assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "expert_load_failed"
    assert int(unknown.headers["Retry-After"]) >= 1
    assert "'no_such_model'" in unknown.json()["error"]["message"]
    refused = chat(front, model="gemma3_multimodal")
    assert refused.status_code == 503 and "HTTP 401" in refused.json()["error"]["message"]
    health = front.health()["experts"]
    assert health["gemma3_multimodal"]["state"] == health["aya_expanse_multilingual"]["state"] == "failed"
    assert "HTTP 401" in health["gemma3_multimodal"]["error"]
    stats = front.stats()["experts"]
    assert stats["gemma3_multimodal"]["load_failures"] >= 1 and stats["gemma3_multimodal"]["loads"] == 0
    for path in ("/v1/models", "/health", "/stats", "/metrics"):
        text = requests.get(front.url + path, timeout=5).text
        assert KEY not in text and WRONG_KEY not in text, path
    assert KEY not in unknown.text + refused.text and WRONG_KEY not in unknown.text + refused.text
    host_log = HostAddress.for_config(front.config, load_config(front.config)).log.read_text()
    assert "HTTP 401" in host_log  # the host loads the experts, so the host logs why a load failed
    for log in (host_log, front.tail(10_000)):
        assert KEY not in log and WRONG_KEY not in log


def test_upstream_rejects_requests_without_the_key(pair):
    _, upstream = pair
    assert requests.get(upstream.url + "/v1/models", timeout=5).status_code == 401  # so the front sends it


# The upstream's answer -> what the client gets: its own mistakes pass through with the upstream's status and
# words; the upstream's are 5xx (retryable when the upstream says it is unavailable).
UPSTREAM_ERRORS = [("[[status=400]]", 400, None), ("[[status=429]]", 429, None),
                   ("[[status=401]]", 502, "upstream_error"), ("[[status=404]]", 502, "upstream_error"),
                   ("[[status=500]]", 502, "upstream_error"), ("[[status=503]]", 503, "upstream_unavailable"),
                   ("[[fail]]", 502, "upstream_error")]


@pytest.mark.parametrize("directive, status, code", UPSTREAM_ERRORS)
def test_upstream_errors_become_openai_errors(pair, directive, status, code):
    front, upstream = pair
    response = chat(front, model="phi4_fast", messages=[{"role": "user", "content": f"hello {directive}"}])
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    if status < 500:  # the client's fault: the upstream's words and type
        assert error["message"] == f"scripted status {status}" and error["type"] == "invalid_request_error"
    else:
        assert "expert 'phi4_fast'" in error["message"] and upstream.url in error["message"]
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 1
    if directive == "[[fail]]":
        assert "scripted failure" in error["message"]
    assert KEY not in response.text
    assert wait_idle(front, "phi4_fast")["active_requests"] == 0


@pytest.mark.parametrize("directive", ["[[fail]]", "[[cut]]"])
def test_upstream_failure_in_mid_stream_is_an_error_event(pair, directive):
    front, upstream = pair
    response = chat(front, model="phi4_fast", stream=True,
                    messages=[{"role": "user", "content": f"one two {directive} three"}])
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["content"] == "echo:"
    error = events[-2]["error"]
    assert error["code"] == "upstream_error" and "expert 'phi4_fast'" in error["message"]
    assert KEY not in response.text
    assert wait_idle(front, "phi4_fast")["active_streams"] == 0


def test_client_disconnect_aborts_the_upstream_request(tmp_path, start_server):
    upstream = FakeUpstream(token_delay=0.2)
    try:
        path, config = make_config(tmp_path, engine="fake", upstream=upstream.url)
        front = start_server("streaming", path)
        words = " ".join(f"word{i}" for i in range(60))  # 12 s of tokens
        body = json.dumps({"model": "phi4_fast", "messages": [{"role": "user", "content": words}],
                           "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", front.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
            stats = front.stats()
            assert (stats["experts"]["phi4_fast"]["active_requests"], stats["active_streams"]) == (1, 1)
            assert upstream.open_streams() == 1
        wait_closed(upstream, timeout=3)  # within a token or two of the disconnect
        stats = wait_idle(front, "phi4_fast")
        assert (stats["active_requests"], stats["active_streams"], stats["queued_requests"]) == (0, 0, 0)
        assert stats["errors"] == 0  # a client that leaves is not an expert's failure
    finally:
        upstream.stop()


def test_upstream_down_is_a_503_then_recovers(tmp_path, start_server):
    port = free_port()
    path, config = make_config(tmp_path, engine="fake", upstream=f"http://127.0.0.1:{port}", name="front.json",
                               restart_backoff_s=0.2)  # a failed load is retried after this backoff
    remote(config, "phi4_fast", f"http://127.0.0.1:{port}", connect_timeout_s=2)
    front = start_server("standard", write_config(path, config))

    down = chat(front, model="phi4_fast")
    assert down.status_code == 503 and int(down.headers["Retry-After"]) >= 1
    assert down.json()["error"]["code"] == "expert_load_failed"
    assert f"127.0.0.1:{port}" in down.json()["error"]["message"] and "unreachable" in down.json()["error"]["message"]
    assert front.health()["experts"]["phi4_fast"]["state"] == "failed"

    upstream = FakeUpstream(port=port)
    try:
        assert chat(front, model="phi4_fast").json()["choices"][0]["message"]["content"] == ECHO
        assert front.health()["experts"]["phi4_fast"]["state"] == "ready"
        stats = front.stats()["experts"]["phi4_fast"]
        assert (stats["loads"], stats["load_failures"]) == (1, 1)
    finally:
        upstream.stop()  # gone after loading: each request is a retryable 503 until it is back
    gone = chat(front, model="phi4_fast")
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "upstream_unavailable", gone.text
    assert int(gone.headers["Retry-After"]) >= 1 and f"127.0.0.1:{port}" in gone.json()["error"]["message"]
    upstream = FakeUpstream(port=port)
    try:
        assert chat(front, model="phi4_fast").status_code == 200
    finally:
        upstream.stop()


def test_upstream_slow_is_a_504_and_the_upstream_request_is_dropped(tmp_path, start_server):
    upstream = FakeUpstream()
    try:
        path, config = make_config(tmp_path, engine="fake", upstream=upstream.url, name="front.json")
        remote(config, "phi4_fast", upstream.url, read_timeout_s=1)
        front = start_server("standard", write_config(path, config))
        assert chat(front, model="phi4_fast").status_code == 200

        started = time.monotonic()
        slow = chat(front, model="phi4_fast", messages=[{"role": "user", "content": "[[sleep=5]] hello"}])
        assert slow.status_code == 504 and time.monotonic() - started < 3
        error = slow.json()["error"]
        assert error["code"] == "upstream_timeout" and error["type"] == "timeout_error"
        assert int(slow.headers["Retry-After"]) >= 1 and "read_timeout_s" in error["message"]

        # a stream whose first token is late: the same 504 (nothing was sent yet), and the upstream's stream is
        # closed, not left running
        late = chat(front, model="phi4_fast", stream=True, messages=[{"role": "user", "content": "[[delay=4]] hi"}])
        assert late.status_code == 504 and late.json()["error"]["code"] == "upstream_timeout"
        wait_closed(upstream)
        assert wait_idle(front, "phi4_fast")["active_requests"] == 0
        assert chat(front, model="phi4_fast").status_code == 200  # the expert stays usable
    finally:
        upstream.process.kill()
        upstream.process.wait()


def test_consensus_across_experts_on_two_upstreams(tmp_path, start_server, fake_upstream):
    upstream = FakeUpstream()
    try:
        path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url, name="front.json",
                                   max_loaded_experts=5)
        config["consensus"].update(experts_per_request=2)
        top = Router.from_config(load_config(write_config(path, config))).route(
            (ChatMessage(role="user", content=PROMPT),)).ranking()
        remote(config, top[0], upstream.url)  # the best-ranked is on its own upstream, so it also writes the synthesis
        front = start_server("consensus", write_config(path, config))

        response = chat(front)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == ECHO
        consensus = body["consensus"]
        assert [e["id"] for e in consensus["experts"]] == list(top[:2]) and consensus["synthesizer"] == top[0]
        assert all(e["ok"] and e["completion_tokens"] == len(ECHO.split()) for e in consensus["experts"])
        assert consensus["method"] == "synthesis"
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(client.chat.completions.create(model="auto", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ECHO
        assert len(upstream.requests()) == 4  # candidate and synthesis, twice
        synthesis = upstream.requests()[-1]["body"]
        assert synthesis["messages"][0]["role"] == "system" and synthesis["messages"][-1] == MESSAGES[0]
    finally:
        upstream.stop()


def test_real_vllm_upstream(vllm_server, tmp_path, start_server, fake_upstream):
    """A front relaying phi4_fast to another Capibara6 server on the real engine answers what that server does."""
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url, name="front.json")
    remote(config, "phi4_fast", vllm_server.url, "phi4_fast")
    front = start_server("standard", write_config(path, config))
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    args = dict(model="phi4_fast", messages=MESSAGES, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**args)
    assert full.choices[0].message.content.strip()
    direct = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120).chat.completions.create(**args)
    assert full.choices[0].message.content == direct.choices[0].message.content and full.usage == direct.usage
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage == full.usage


# ---------------------------------------------------------------- core.upstream.Upstream on its own

BODY = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


def client(url: str, **options) -> Upstream:
    return Upstream(url, where=f"its upstream ({url})", **options)


async def test_models_complete_and_stream_with_the_key(keyed, monkeypatch):
    monkeypatch.setenv("FAR_KEY", KEY)
    upstream = client(keyed.url + "/v1", api_key_env="FAR_KEY")  # an OpenAI-client style URL works too
    try:
        assert upstream.base_url == keyed.url
        assert await upstream.models() == list(FAKE_MODELS)
        answer = await upstream.complete("/v1/chat/completions", BODY)
        assert answer["choices"][0]["message"]["content"] == "echo: one two three"
        assert answer["usage"]["completion_tokens"] == 4
        events = [event async for event in upstream.stream(
            "/v1/chat/completions", {**BODY, "stream": True, "stream_options": {"include_usage": True}})]
    finally:
        await upstream.close()
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == \
        "echo: one two three"
    assert len(events) == 5 and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert keyed.requests()[-1]["body"] == {**BODY, "stream": True, "stream_options": {"include_usage": True}}


async def test_a_missing_or_wrong_key_is_misconfigured_and_never_shown(keyed, monkeypatch):
    with pytest.raises(UpstreamError, match="NO_SUCH_VARIABLE_42") as raised:
        client(keyed.url, api_key_env="NO_SUCH_VARIABLE_42")
    assert raised.value.failure is Failure.MISCONFIGURED
    monkeypatch.setenv("WRONG_KEY", WRONG_KEY)
    for options in ({}, {"api_key_env": "WRONG_KEY"}):
        upstream = client(keyed.url, **options)
        try:
            with pytest.raises(UpstreamError) as raised:
                await upstream.models()
        finally:
            await upstream.close()
        error = raised.value
        assert error.failure is Failure.MISCONFIGURED and error.status == 401 and "HTTP 401" in error.message
        assert WRONG_KEY not in error.message and KEY not in error.message


FAILURES = [("[[status=400]]", Failure.REJECTED, 400), ("[[status=429]]", Failure.REJECTED, 429),
            ("[[status=401]]", Failure.MISCONFIGURED, 401), ("[[status=404]]", Failure.MISCONFIGURED, 404),
            ("[[status=500]]", Failure.FAILED, 500), ("[[status=503]]", Failure.UNAVAILABLE, 503),
            ("[[fail]]", Failure.FAILED, None), ("[[cut]]", Failure.BROKEN, None),
            ("[[sleep=3]]", Failure.TIMEOUT, None)]


@pytest.mark.parametrize("directive, failure, status, stream", [
    (*case, stream) for case in FAILURES for stream in (False, True)
    if not (case[0] == "[[cut]]" and not stream)])  # the fake upstream cuts streams only
async def test_each_upstream_failure_is_named(fake_upstream, directive, failure, status, stream):
    upstream = client(fake_upstream.url, read_timeout_s=1)
    body = {**BODY, "messages": [{"role": "user", "content": f"one {directive} two"}], "stream": stream}
    try:
        with pytest.raises(UpstreamError) as raised:
            if stream:
                async for _ in upstream.stream("/v1/chat/completions", body):
                    pass
            else:
                await upstream.complete("/v1/chat/completions", body)
    finally:
        await upstream.close()
    error = raised.value
    if directive == "[[fail]]" and not stream:
        status = 500  # a whole answer that fails is the upstream's 500
    assert (error.failure, error.status) == (failure, status), error.message
    if failure is Failure.REJECTED:  # the client's to fix: the upstream's own words and fields
        assert error.message == f"scripted status {status}"
        assert error.fields == {"message": error.message, "type": "invalid_request_error", "param": None,
                                "code": status}
    else:
        assert fake_upstream.url in error.message
    if directive == "[[fail]]":
        assert "scripted failure" in error.message
    if failure is Failure.TIMEOUT:
        assert "read_timeout_s" in error.message


async def test_unreachable_upstream(tmp_path):
    upstream = client(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    try:
        with pytest.raises(UpstreamError, match="unreachable") as raised:
            await upstream.models()
    finally:
        await upstream.close()
    assert raised.value.failure is Failure.UNREACHABLE


async def test_leaving_a_stream_early_closes_the_upstream_stream():
    upstream_server = FakeUpstream(token_delay=0.2)
    upstream = client(upstream_server.url)
    try:
        body = {**BODY, "messages": [{"role": "user", "content": " ".join(["word"] * 40)}], "max_tokens": 64,
                "stream": True}
        events = upstream.stream("/v1/chat/completions", body)
        first = await anext(events)
        assert first["choices"][0]["delta"]["content"] == "echo:" and upstream_server.open_streams() == 1
        await events.aclose()
        deadline = time.monotonic() + 3
        while upstream_server.open_streams():  # the loop must run for the connection to close
            assert time.monotonic() < deadline, "the upstream stream is still open"
            await asyncio.sleep(0.05)
    finally:
        await upstream.close()
        upstream_server.stop()


def test_the_documented_two_host_config_is_valid(tmp_path):
    block = (REPO / "docs" / "remote.md").read_text().split("```json\n", 1)[1].split("```", 1)[0]
    config = load_config(write_config(tmp_path / "two_hosts.json", json.loads(block)))
    remote_experts = {e.id: e.engine.remote_model for e in config.experts if e.engine.kind == "remote"}
    assert remote_experts == {"gemma3_multimodal": "gemma3_multimodal",
                              "aya_expanse_multilingual": "aya_expanse_multilingual"}
