"""Bad input never hurts, shown by a property test against all three server kinds.

test_protocol.py pins one expected error for each known bad-input class. Here hypothesis builds random and
mutated OpenAI requests: wrong types, missing fields, huge and negative numbers, deep nesting, invalid UTF-8,
empty and enormous messages, bad image data, unknown roles and conflicting fields. Each request goes to the
standard, streaming and consensus servers. Every answer must be a 4xx in OpenAI's error shape or a valid 200
(for a stream request, a well-formed SSE stream that ends with [DONE]). It must never be a 5xx, and the servers
must stay healthy with nothing left in flight, and their own error counters (`/stats` http_errors and
`capibara_http_errors_total` in /metrics, which count every error status, error events in streams included) must
show no 5xx. Every expert is the fake upstream (tests/fake_upstream.py), which keeps this fast; the engine is not
what is under test.
"""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import assume, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EMBEDDED, Server, make_config

KINDS = ("standard", "streaming", "consensus")
CHAT, COMPLETIONS, ROUTE = "/v1/chat/completions", "/v1/completions", "/v1/route"
EXPERTS = tuple(e["id"] for e in EMBEDDED["experts"])
MAX_BODY = 64 * 1024  # small, so that bodies over the limit (413) are cheap to make
EXAMPLES = 150
ERROR_FIELDS = {"message", "type", "param", "code"}
DIRECTIVE = re.compile(rb"\[\[(?:sleep=|delay=|status=|fail\]\]|cut\]\]|hang\]\])")  # the fake's fault switches
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, fake_upstream) -> Iterator[dict[str, Server]]:
    """One server of each kind (sharing one model host) on the fake upstream, every expert loadable, a small body
    limit."""
    tmp = tmp_path_factory.mktemp("fuzz")
    path, _ = make_config(tmp, engine="fake", upstream=fake_upstream.url, max_body_bytes=MAX_BODY,
                          max_loaded_experts=len(EXPERTS))
    started = {kind: Server(kind, path, tmp / f"{kind}.log") for kind in KINDS}
    try:
        yield {kind: server.wait_healthy() for kind, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


# ---------------------------------------------------------------- strategies

SPECIAL_NUMBERS = st.sampled_from([0, -1, 1, 2, 17, 1 << 20, (1 << 20) + 1, 1 << 31, 1 << 63, -(1 << 63), 1 << 64,
                                   10 ** 30, -(10 ** 30), 0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, 1e-300, 1e308, -1e308,
                                   float("inf"), float("-inf")])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | SPECIAL_NUMBERS
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
TEXT = st.text(max_size=120)
ENORMOUS_TEXT = st.integers(0, 2 * MAX_BODY).map(lambda size: "word " * (size // 5))  # up to twice the limit


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


IMAGE_URLS = st.one_of(
    st.sampled_from([_data_url("image/png", b"\x89PNG\r\n\x1a\n" + bytes(16)),
                     _data_url("image/jpeg", b"\xff\xd8\xff" + bytes(16)),
                     _data_url("image/webp", b"RIFF\0\0\0\0WEBP" + bytes(8)),
                     _data_url("image/webp", b"RIFF\0\0\0\0WAVE" + bytes(8)),
                     _data_url("image/bmp", b"BM" + bytes(16)),
                     "data:image/png;base64,", "data:image/png,abc", "data:image/png;base64,%%%",
                     "data:;base64,AAAA", "http://127.0.0.1/image.png", "https://", "ftp://host/x.png",
                     "file:///etc/passwd", ""]),
    st.tuples(st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "text/plain"]),
              st.binary(max_size=64)).map(lambda pair: _data_url(*pair)),
    st.text(max_size=40).map(lambda junk: "data:image/png;base64," + junk),
    st.integers(0, 2 * MAX_BODY).map(lambda size: _data_url("image/png", b"\x89PNG\r\n\x1a\n" + bytes(size))),
    JSON_VALUES,
)
CONTENT_PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT | JSON_VALUES}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": IMAGE_URLS}) | IMAGE_URLS}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "image", "TEXT", ""])}),
    JSON_VALUES,
)
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "wizard", "USER", ""]) \
    | JSON_VALUES
BAD_CONTENT = ENORMOUS_TEXT | st.lists(CONTENT_PARTS, max_size=3) | JSON_VALUES
PROMPTS = ENORMOUS_TEXT | st.lists(TEXT, max_size=18) | JSON_VALUES


def _field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A replacement value: usually of the right kind (often out of range), sometimes any JSON value."""
    return plausible | JSON_VALUES


# A valid request is the starting point; each mutation then breaks one field (or drops it).
VALID_IMAGE = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.just(_data_url("image/png", b"\x89PNG\r\n\x1a\n" + bytes(16)))})})
VALID_CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1,
                                max_size=2)
VALID_MESSAGES = st.builds(
    lambda history, last: [*history, last],
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                    "content": VALID_CONTENT}), max_size=2),
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": VALID_CONTENT | st.lists(VALID_IMAGE, min_size=1, max_size=1)}))
VALID_FIELDS = {
    "model": st.sampled_from([*EXPERTS, "auto"]),
    "max_tokens": st.integers(1, 24),
    "max_completion_tokens": st.integers(1, 24),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "n": st.integers(1, 3),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "seed": st.integers(-(1 << 63), (1 << 63) - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 2),
    "stream": st.booleans(),
    "user": TEXT,
    "min_p": st.floats(0, 1),
    "priority": st.integers(-1000, 1000),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4),
    "logit_bias": st.dictionaries(st.integers(0, 50_000).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}]),
}
VALID_BODIES = {
    CHAT: st.fixed_dictionaries({"messages": VALID_MESSAGES}, optional=VALID_FIELDS),
    COMPLETIONS: st.fixed_dictionaries({"prompt": TEXT | st.lists(TEXT, min_size=1, max_size=4)},
                                       optional=VALID_FIELDS),
}
VALID_BODIES[ROUTE] = VALID_BODIES[CHAT] | VALID_BODIES[COMPLETIONS]
BAD_VALUES = {
    "model": _field(st.sampled_from(["nope", "", "AUTO", "phi4_fast "])),
    "max_tokens": _field(st.integers(-3, 0) | SPECIAL_NUMBERS),
    "max_completion_tokens": _field(st.integers(-3, 0) | SPECIAL_NUMBERS),
    "temperature": _field(st.floats(-1, 3) | SPECIAL_NUMBERS),
    "top_p": _field(st.floats(-0.5, 1.5) | SPECIAL_NUMBERS),
    "top_k": _field(st.integers(-3, 100) | SPECIAL_NUMBERS),
    "n": _field(st.integers(-1, 18) | SPECIAL_NUMBERS),
    "stop": _field(st.just("") | st.lists(TEXT, max_size=18)),
    "seed": _field(SPECIAL_NUMBERS),
    "presence_penalty": _field(SPECIAL_NUMBERS),
    "frequency_penalty": _field(SPECIAL_NUMBERS),
    "repetition_penalty": _field(SPECIAL_NUMBERS),
    "stream": _field(st.sampled_from(["true", 1, 0])),
    "min_p": _field(st.floats(-1, 2) | SPECIAL_NUMBERS),
    "priority": _field(SPECIAL_NUMBERS),
    "ignore_eos": _field(st.sampled_from(["yes", 1, None])),
    "min_tokens": _field(st.integers(-3, 0) | SPECIAL_NUMBERS),
    "logit_bias": _field(st.dictionaries(TEXT, SPECIAL_NUMBERS, max_size=3)),
    "response_format": _field(st.fixed_dictionaries({"type": _field(st.sampled_from(["json_schema", "yaml", ""]))},
                                                    optional={"json_schema": JSON_VALUES})),
    # Fields no front supports (refused by name), and the OpenAI fields of the other endpoint.
    "suffix": JSON_VALUES,
    "functions": JSON_VALUES,
    "echo": JSON_VALUES,
    "logprobs": JSON_VALUES,
    "top_logprobs": _field(st.integers(-1, 21)),
    "tool_choice": _field(st.sampled_from(["auto", "none", "required", "sometimes",
                                           {"type": "function", "function": {"name": "f"}}])),
    "stream_options": _field(st.fixed_dictionaries({}, optional={"include_usage": _field(st.booleans())})),
    "messages": _field(st.lists(JSON_VALUES, max_size=3)),
    "prompt": PROMPTS,
    "tools": JSON_VALUES,
    "role": ROLES,
    "content": BAD_CONTENT,
    "name": JSON_VALUES,
    "type": _field(st.sampled_from(["input_audio", "image", "TEXT", "image_url", "text", ""])),
    "text": JSON_VALUES,
    "image_url": _field(st.fixed_dictionaries({"url": IMAGE_URLS}) | IMAGE_URLS),
}
BYTE_MUTATIONS = (None,) * 12 + ("truncate", "invalid utf-8", "deep nesting", "binary")
INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28", b"\x80")


def _targets(body: dict) -> list[tuple[dict, str]]:
    """Every (object, key) a mutation may replace or drop: top-level fields, message fields, content parts."""
    targets = [(body, key) for key in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                                       "top_k", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                                       "repetition_penalty", "stream", "stream_options", "messages", "prompt",
                                       "tools", "min_p", "priority", "ignore_eos", "min_tokens", "logit_bias",
                                       "response_format", "suffix", "functions", "echo", "logprobs",
                                       "top_logprobs", "tool_choice")]
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            targets += [(message, "role"), (message, "content"), (message, "name")]
            parts = message.get("content")
            targets += [(part, key) for part in (parts if isinstance(parts, list) else ()) if isinstance(part, dict)
                        for key in ("type", "text", "image_url")]
    return targets


@st.composite
def request_bodies(draw, endpoint: str) -> tuple[bytes, Any]:
    """A raw request body and, when it is still the JSON object it was built as, that object.

    A valid request gets up to three mutations (a field replaced by a bad value, or dropped), then one time in
    four its bytes are broken too.
    """
    body: dict[str, Any] = draw(VALID_BODIES[endpoint])
    if body.get("stream") is True and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for _ in range(draw(st.integers(0, 3))):
        target, key = draw(st.sampled_from(_targets(body)))
        if key in target and draw(st.integers(0, 3)) == 0:
            del target[key]
        else:
            target[key] = draw(BAD_VALUES[key])
    raw = json.dumps(body).encode()  # floats inf and -inf become Infinity, which is not JSON
    mutation = draw(st.sampled_from(BYTE_MUTATIONS))
    if mutation == "truncate":
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))], None
    if mutation == "invalid utf-8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:], None
    if mutation == "deep nesting":
        depth = draw(st.integers(1, 20_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        nested = opener * depth + b"1" + closer * depth
        return b'{"messages": [{"role": "user", "content": ' + nested + b'}], "prompt": ' + nested + b"}", None
    if mutation == "binary":
        return draw(st.binary(max_size=256)), None
    return raw, body


# ---------------------------------------------------------------- checking answers


def check_error(response: requests.Response) -> None:
    """A 4xx with OpenAI's error object and nothing internal in it."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and isinstance(error["type"], str)
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]


def check_stream(response: requests.Response, endpoint: str) -> None:
    """Every event is a data line holding a chunk of the endpoint's kind; the last is [DONE]; no error events."""
    kind = "chat.completion.chunk" if endpoint == CHAT else "text_completion"
    blocks = response.content.decode("utf-8").split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], blocks[-3:]
    for block in blocks[:-2]:
        assert block.startswith("data: "), block[:200]
        chunk = json.loads(block[len("data: "):])
        assert "error" not in chunk, chunk
        assert chunk["object"] == kind and isinstance(chunk["choices"], list)


def check_full(body: dict, endpoint: str) -> None:
    """A full response of the endpoint's kind: a routing decision, or choices with text and consistent usage."""
    if endpoint == ROUTE:
        assert body["expert"] in EXPERTS and set(body["ranking"]) == set(EXPERTS)
        assert 0.0 <= body["confidence"] <= 1.0 + 1e-9
        return
    assert body["object"] == ("chat.completion" if endpoint == CHAT else "text_completion")
    assert body["choices"] and all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    for choice in body["choices"]:
        assert isinstance(choice["message"]["content"] if endpoint == CHAT else choice["text"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_answer(response: requests.Response, endpoint: str, sent: Any) -> None:
    """A 4xx error, or a 200 that is a valid response or (for stream requests) a valid SSE stream."""
    if response.status_code != 200:
        check_error(response)
        return
    is_stream = response.headers["Content-Type"] == "text/event-stream"
    if isinstance(sent, dict) and endpoint != ROUTE:
        assert is_stream == (sent.get("stream") is True), (sent.get("stream"), response.headers)
    if is_stream:
        check_stream(response, endpoint)
    else:
        check_full(response.json(), endpoint)


def send_everywhere(servers: dict[str, Server], endpoint: str, body: tuple[bytes, Any]) -> None:
    """The same raw body to every server kind; a bad answer names the server and the body."""
    raw, sent = body
    assume(not DIRECTIVE.search(raw))
    for kind, server in servers.items():
        response = requests.post(server.url + endpoint, data=raw, timeout=60,
                                 headers={"Content-Type": "application/json"})
        try:
            check_answer(response, endpoint, sent)
        except (AssertionError, KeyError, ValueError) as error:
            raise AssertionError(f"{kind} server, {endpoint}: {error!r}\nbody: {raw[:300]!r}") from error


# ---------------------------------------------------------------- the properties


@FUZZ
@given(body=request_bodies(CHAT))
def test_chat_completions_never_fail_on_bad_input(servers, body):
    send_everywhere(servers, CHAT, body)


@FUZZ
@given(body=request_bodies(COMPLETIONS))
def test_completions_never_fail_on_bad_input(servers, body):
    send_everywhere(servers, COMPLETIONS, body)


@FUZZ
@given(body=request_bodies(ROUTE))
def test_route_never_fails_on_bad_input(servers, body):
    send_everywhere(servers, ROUTE, body)


def error_statuses(server: Server) -> tuple[dict[str, float], dict[str, int]]:
    """Error answers by status, as /metrics (capibara_http_errors_total) and /stats (http_errors) count them."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    metric = {sample.labels["status"]: sample.value
              for family in text_string_to_metric_families(text) if family.name == "capibara_http_errors"
              for sample in family.samples if sample.name == "capibara_http_errors_total"}
    return metric, server.stats()["http_errors"]


def test_servers_stay_healthy_after_the_fuzzing(servers, fake_upstream):
    """Still alive, nothing left in flight or streaming, never a 5xx counted, and ordinary requests still work."""
    for kind, server in servers.items():
        assert server.process.poll() is None, f"{kind} server died:\n{server.tail()}"
        assert server.health()["status"] == "ok"
        stats = server.stats()
        assert stats["active_streams"] == 0
        assert all(e["active_requests"] == 0 and e["queued_requests"] == 0 and e["runner"]["active_requests"] == 0
                   for e in stats["experts"].values()), stats["experts"]
        metric, counted = error_statuses(server)
        assert metric == {status: float(n) for status, n in counted.items()}, (metric, counted)
        assert not [status for status in counted if status.startswith("5")], counted
        assert "unhandled error" not in server.log.read_text(errors="replace"), server.tail()
        answer = requests.post(server.url + CHAT, timeout=30, json={"messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
    assert fake_upstream.open_streams() == 0
