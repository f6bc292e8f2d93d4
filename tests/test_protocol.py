"""The OpenAI protocol over real sockets, on fronts whose experts are all the fake upstream (tests/fake_upstream.py):
every bad-input class gets a 4xx in OpenAI's error shape naming the field, and the server stays healthy; what
passes validation reaches the upstream as the expert's request (its system prompt, its sampling defaults, the
front's priority, the upstream's model name, every pass-through field unchanged); answers and chunks come back
in OpenAI's shape with the expert's id; every error status, before or after a stream starts, is counted."""
import base64
import json
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EMBEDDED, fake_engine, make_config, write_config

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello there"}]
EXPERTS = {expert["id"]: expert for expert in EMBEDDED["experts"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}

BAD_CHAT = [
    ({"messages": USER, "model": "nope"}, 404, "model", "model_not_found"),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": "hi"}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages", "invalid_value"),
    ({"messages": ["hi"]}, 400, "messages[0]", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0]", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0]", "invalid_value"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text",
     "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     400, "messages[0].content[0].image_url.url", "invalid_image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]},
     400, "messages[0].content[0].image_url.url", "invalid_image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a").decode()}}]}]},
     400, "messages[0].content[0].image_url.url", "invalid_image"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}, *USER]},
     400, "messages[0]", None),
    ({"messages": USER, "model": 7}, 400, "model", "invalid_value"),
    ({"messages": USER, "model": ""}, 400, "model", "invalid_value"),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"messages": USER, "top_k": -5}, 400, "top_k", "invalid_value"),
    ({"messages": USER, "min_p": 2}, 400, "min_p", "invalid_value"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": True}, 400, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": 10 ** 30}, 400, "max_tokens", "invalid_value"),
    ({"messages": USER, "n": 0}, 400, "n", "invalid_value"),
    ({"messages": USER, "n": 1000}, 400, "n", "invalid_value"),
    ({"messages": USER, "stop": 5}, 400, "stop", "invalid_value"),
    ({"messages": USER, "stop": ["ok", 3]}, 400, "stop[1]", "invalid_value"),
    ({"messages": USER, "stop": [""]}, 400, "stop[0]", "invalid_value"),
    ({"messages": USER, "stop": ["s"] * 17}, 400, "stop", "invalid_value"),
    ({"messages": USER, "seed": "abc"}, 400, "seed", "invalid_value"),
    ({"messages": USER, "seed": 1 << 64}, 400, "seed", "invalid_value"),
    ({"messages": USER, "presence_penalty": 9}, 400, "presence_penalty", "invalid_value"),
    ({"messages": USER, "frequency_penalty": "x"}, 400, "frequency_penalty", "invalid_value"),
    ({"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    ({"messages": USER, "logit_bias": {"42": 200}}, 400, "logit_bias", "invalid_value"),
    ({"messages": USER, "priority": 5000}, 400, "priority", "invalid_value"),
    ({"messages": USER, "user": 5}, 400, "user", "invalid_value"),
    ({"messages": USER, "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"messages": USER, "stream": 1}, 400, "stream", "invalid_value"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, None, "invalid_value"),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": "y"}}, 400,
                 "stream_options.include_usage", "invalid_value"),
    ({"messages": USER, "top_logprobs": 2}, 400, None, "invalid_value"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     400, None, "invalid_value"),
    ({"messages": USER, "tool_choice": "required"}, 400, None, "invalid_value"),
    ({"messages": USER, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice", "invalid_value"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, 400,
     "tools[0].function.name", "invalid_value"),
    ({"messages": USER, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400, "tools[0].type",
     "invalid_value"),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format", "invalid_value"),
    ({"messages": USER, "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid_value"),
]

BAD_COMPLETIONS = [
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": 12}, 400, "prompt", "invalid_value"),
    ({"prompt": []}, 400, "prompt", "invalid_value"),
    ({"prompt": [1, 2, 3]}, 400, "prompt[0]", "invalid_value"),
    ({"prompt": ["a"] * 17}, 400, "prompt", "invalid_value"),
    ({"prompt": "hi", "model": "nope"}, 404, "model", "model_not_found"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "hi", "logprobs": 9}, 400, "logprobs", "invalid_value"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None, "invalid_value"),
    ({"prompt": "hi", "logprobs": True}, 400, "logprobs", "invalid_value"),
    ({"prompt": "hi", "echo": "yes"}, 400, "echo", "invalid_value"),
]

# Fields neither the fronts nor the runners support: refused and named, never silently dropped.
UNSUPPORTED = [
    (CHAT, {"messages": USER, "foo": 1}, "foo"),
    (CHAT, {"messages": USER, "suffix": "y"}, "suffix"),
    (CHAT, {"messages": USER, "echo": True}, "echo"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "bar": 2}]}, "messages[0].bar"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "bar": 2}]}]},
     "messages[0].content[0].bar"),
    (CHAT, {"messages": USER, "stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "foo": 1}, "foo"),
    (COMPLETIONS, {"prompt": "x", "messages": USER}, "messages"),
    (COMPLETIONS, {"prompt": "x", "tools": [TOOL]}, "tools"),
]


def assert_error(response: requests.Response, status: int, param=None, code=None, mentions: str | None = None) -> dict:
    """An OpenAI error object with this status; `param` and `code` are checked unless None."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if mentions is not None:
        assert mentions in error["message"], error
    return error


@pytest.mark.parametrize("body, status, param, code", BAD_CHAT)
def test_bad_chat_requests(fake_server, body, status, param, code):
    assert_error(requests.post(fake_server.url + CHAT, json=body, timeout=10), status, param, code)


@pytest.mark.parametrize("body, status, param, code", BAD_COMPLETIONS)
def test_bad_completion_requests(fake_server, body, status, param, code):
    assert_error(requests.post(fake_server.url + COMPLETIONS, json=body, timeout=10), status, param, code)


@pytest.mark.parametrize("endpoint, body, param", UNSUPPORTED)
def test_unsupported_fields_are_refused_by_name(fake_server, endpoint, body, param):
    error = assert_error(requests.post(fake_server.url + endpoint, json=body, timeout=10), 400, param,
                         "unsupported_parameter", mentions=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, mentions", [
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "user or assistant"),
    ({"messages": USER, "top_logprobs": 2}, "logprobs"),
    ({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "get_time"),
    ({"messages": USER, "tool_choice": "required"}, "tools"),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, "json_schema"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream"),
])
def test_inconsistent_fields_say_what_is_wrong(fake_server, body, mentions):
    assert_error(requests.post(fake_server.url + CHAT, json=body, timeout=10), 400, code="invalid_value",
                 mentions=mentions)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_whole_request_rules_name_their_field(fake_server, body, param):
    assert_error(requests.post(fake_server.url + CHAT, json=body, timeout=10), 400, param, "invalid_value")


def test_unknown_content_part_is_not_an_image_error(fake_server):
    body = {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}
    assert_error(requests.post(fake_server.url + CHAT, json=body, timeout=10), 400, "messages[0].content[0]",
                 "invalid_value")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"", b'{"messages": "\xff\xfe"}',
                                 b'{"messages": [' * 5000])
def test_undecodable_bodies(fake_server, raw):
    response = requests.post(fake_server.url + CHAT, data=raw, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert_error(response, 400)


def test_unknown_route_and_method(fake_server):
    assert_error(requests.get(fake_server.url + "/v1/nothing", timeout=10), 404)
    assert_error(requests.get(fake_server.url + CHAT, timeout=10), 405)


def test_image_to_text_only_expert_names_the_expert(fake_server, fake_upstream):
    marker = uuid.uuid4().hex
    body = {"model": "phi4_fast", "messages": [{"role": "user", "content": [
        {"type": "text", "text": f"what is this? {marker}"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]}
    error = assert_error(requests.post(fake_server.url + CHAT, json=body, timeout=10), 400,
                         code="images_not_supported")
    assert "phi4_fast" in error["message"]
    assert not [r for r in fake_upstream.requests() if marker in json.dumps(r["body"])]


def test_server_healthy_after_bad_input(fake_server):
    before = fake_server.stats()["http_errors"]
    bodies = [getattr(case, "values", case)[0] for case in BAD_CHAT]  # a case, or a pytest.param of one
    statuses = [requests.post(fake_server.url + CHAT, json=body, timeout=10).status_code for body in bodies]
    assert fake_server.health()["status"] == "ok"
    after = fake_server.stats()["http_errors"]
    for status in (400, 404):
        assert statuses.count(status) > 0
        assert after.get(str(status), 0) - before.get(str(status), 0) == statuses.count(status), (before, after)
    ok = requests.post(fake_server.url + CHAT, json={"model": "phi4_fast", "messages": USER}, timeout=10)
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(tmp_path, start_server, fake_upstream):
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url, max_body_bytes=4096)
    server = start_server("standard", path)
    body = {"model": "phi4_fast", "messages": [{"role": "user", "content": "x" * 10000}]}
    assert_error(requests.post(server.url + CHAT, json=body, timeout=10), 413)
    assert server.health()["status"] == "ok"
    assert server.stats()["http_errors"] == {"413": 1}


def test_chat_response_shape(fake_server):
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "qwen_coder", "messages": USER, "n": 2, "user": "someone", "seed": 3})
    assert response.status_code == 200
    assert response.headers["X-Capibara-Expert"] == "qwen_coder"
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "qwen_coder" and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"] == {"role": "assistant", "content": "echo: hello there"}
        assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_max_tokens_and_stop(fake_server):
    long = [{"role": "user", "content": "one two three four five six"}]
    body = requests.post(fake_server.url + CHAT, timeout=10,
                         json={"model": "phi4_fast", "messages": long, "max_tokens": 3}).json()
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "echo: one two"},
                                  "logprobs": None, "finish_reason": "length"}
    body = requests.post(fake_server.url + CHAT, timeout=10,
                         json={"model": "phi4_fast", "messages": long, "stop": [" four", "zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == "echo: one two three"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_with_prompt_list(fake_server, fake_upstream):
    marker = uuid.uuid4().hex
    body = requests.post(fake_server.url + COMPLETIONS, timeout=10, json={
        "model": "phi4_fast", "prompt": ["a b", f"c {marker}"], "n": 2}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "phi4_fast"
    texts = [(c["index"], c["text"]) for c in body["choices"]]
    assert texts == [(0, f"echo: a b c {marker}"), (1, f"echo: a b c {marker}")]  # the fake joins a prompt list
    sent = upstream_body(fake_upstream, marker)
    assert sent["prompt"] == ["a b", f"c {marker}"] and sent["n"] == 2


def read_sse(response: requests.Response) -> list:
    assert response.headers["Content-Type"] == "text/event-stream"
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_stream_chunks_and_usage(fake_server):
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": USER, "stream": True, "n": 2,
        "stream_options": {"include_usage": True}})
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["model"] == "phi4_fast"
    ids = {c["id"] for c in chunks} | {usage_chunk["id"]}
    assert len(ids) == 1
    text = {0: "", 1: ""}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert all("role" not in m["delta"] for m in mine[1:])
        assert mine[-1]["finish_reason"] == "stop"
        assert all(m["finish_reason"] is None for m in mine[:-1])
        text[index] = "".join(m["delta"].get("content", "") for m in mine)
    assert text == {0: "echo: hello there", 1: "echo: hello there"}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "phi4_fast"
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
        assert "usage" not in chunk


def test_usage_chunk_only_when_asked(fake_server, fake_upstream):
    """The front always asks the upstream for usage (it counts tokens) but relays it only to a client that asked."""
    marker = uuid.uuid4().hex
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": [{"role": "user", "content": f"count {marker}"}], "stream": True})
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events[:-1]), events
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == f"echo: count {marker}"
    assert upstream_body(fake_upstream, marker)["stream_options"] == {"include_usage": True,
                                                                       "continuous_usage_stats": False}
    stats = fake_server.stats()["experts"]["phi4_fast"]
    assert stats["completion_tokens"] >= 3  # counted from the usage the client never saw


def test_completion_stream(fake_server):
    response = requests.post(fake_server.url + COMPLETIONS, timeout=10, json={
        "model": "phi4_fast", "prompt": "x y", "stream": True})
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" and e["model"] == "phi4_fast" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "echo: x y"


def test_error_after_stream_start_is_an_sse_error(fake_server):
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "mistral_balanced", "stream": True, "messages": [{"role": "user", "content": "a [[fail]] b"}]})
    assert response.status_code == 200
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"}
    assert events[-2]["error"]["code"] == "upstream_error" and events[-2]["error"]["type"] == "server_error"
    assert events[0]["choices"][0]["delta"]["content"] == "echo:" and events[0]["model"] == "mistral_balanced"


def test_error_before_stream_start_is_json(fake_server):
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "nope", "stream": True, "messages": USER})
    assert_error(response, 404, "model", "model_not_found")
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "stream": True, "messages": [{"role": "user", "content": "[[status=500]]"}]})
    assert_error(response, 502, code="upstream_error")


def test_upstream_client_errors_pass_through(fake_server):
    """An upstream 4xx (other than 401/403/404, which are our misconfiguration) is the client's mistake."""
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": [{"role": "user", "content": "too long [[status=400]]"}]})
    assert_error(response, 400, mentions="scripted status 400")


def test_api_key(tmp_path, start_server, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    server = start_server("standard", path, env={"CAPIBARA_API_KEY": "sekret"})
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    for method, route in [("get", "/v1/models"), ("get", "/stats"), ("get", "/metrics"), ("post", CHAT),
                          ("post", "/admin/experts/phi4_fast/load")]:
        error = assert_error(getattr(requests, method)(server.url + route, json={}, timeout=5), 401)
        assert error["type"] == "authentication_error"
        wrong = getattr(requests, method)(server.url + route, json={}, timeout=5,
                                          headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
    ok = requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": USER}, timeout=10,
                       headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


# ---------------------------------------------------------------- what reaches the upstream


def upstream_body(fake_upstream, marker: str) -> dict:
    """The one request body the fake upstream received that carries `marker`."""
    found = [r["body"] for r in fake_upstream.requests() if marker in json.dumps(r["body"])]
    assert len(found) == 1, found
    return found[0]


def sampling_defaults(expert_id: str, forced_tool_call: bool = False) -> dict:
    """What the front fills in for an expert when the client leaves sampling out (configs/embedded.json)."""
    sampling = EXPERTS[expert_id]["sampling"]
    defaults = {"max_tokens": sampling["max_tokens"], "temperature": sampling["temperature"],
                "top_p": sampling["top_p"]}
    if sampling.get("top_k", -1) > 0:
        defaults["top_k"] = sampling["top_k"]
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        defaults["repetition_penalty"] = sampling["repetition_penalty"]
    if forced_tool_call:
        defaults["frequency_penalty"] = sampling.get("tool_call_frequency_penalty", 0.5)
    return defaults


PASS_THROUGH = {
    "tools": [TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": {"type": "object", "properties": {"celsius": {"type": "number"}}},
        "strict": True}},
    "logprobs": True,
    "top_logprobs": 2,
    "seed": 1234,
    "n": 2,
    "ignore_eos": True,
    "min_tokens": 2,
    "min_p": 0.05,
    "logit_bias": {"42": -100.0},
    "stop": ["zzz"],
    "stop_token_ids": [7],
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": False,
    "parallel_tool_calls": False,
    "user": "someone",
}


def test_pass_through_fields_reach_the_upstream_unchanged(fake_server, fake_upstream):
    marker = uuid.uuid4().hex
    user = {"role": "user", "content": f"weather {marker}"}
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "qwen_coder", "messages": [user], "stream": True,
        "stream_options": {"continuous_usage_stats": True}, **PASS_THROUGH})
    assert response.status_code == 200, response.text
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert {e["model"] for e in events[:-1]} == {"qwen_coder"}
    assert all(e["choices"] for e in events[:-1]), "a usage chunk the client did not ask for"
    assert {e["choices"][0]["index"] for e in events[:-1]} == {0, 1}

    sent = upstream_body(fake_upstream, marker)
    expert = EXPERTS["qwen_coder"]
    assert sent == {
        **PASS_THROUGH,
        "model": "echo",  # the upstream's name for the model, not the expert id
        "messages": [{"role": "system", "content": expert["system_prompt"]}, user],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "priority": 0,  # the standard front's
        **sampling_defaults("qwen_coder", forced_tool_call=True),  # PASS_THROUGH names a function
    }


def test_client_choices_win_over_expert_defaults(fake_server, fake_upstream):
    """A client's system (or developer) message replaces the expert's prompt; its sampling fields are kept."""
    marker = uuid.uuid4().hex
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": f"hi {marker}"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"again {marker}"}]
    answer = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": messages, "temperature": 0, "top_p": 0.5, "max_completion_tokens": 7,
        "top_k": 3, "repetition_penalty": 1.1, "priority": 4}).json()
    assert answer["model"] == "phi4_fast"
    assert answer["choices"][0]["message"]["content"] == f"echo: again {marker}"
    sent = upstream_body(fake_upstream, marker)
    assert sent["messages"] == [{"role": "system", "content": "Be terse."}, *messages[1:]]
    assert (sent["temperature"], sent["top_p"], sent["max_completion_tokens"], sent["top_k"],
            sent["repetition_penalty"]) == (0, 0.5, 7, 3, 1.1)
    assert "max_tokens" not in sent
    assert sent["priority"] == 4 and sent["model"] == "echo" and sent["stream"] is False


@pytest.mark.parametrize("choice, penalty", [("required", 0.5), ("auto", None), ("none", None),
                                             ({"type": "function", "function": {"name": "get_weather"}}, 0.5)])
def test_a_forced_tool_call_gets_the_tool_call_frequency_penalty_unless_the_client_set_one(fake_server,
                                                                                            fake_upstream,
                                                                                            choice, penalty):
    sent = []
    for own in ({}, {"frequency_penalty": 0.0}):
        marker = uuid.uuid4().hex
        response = requests.post(fake_server.url + CHAT, timeout=10, json={
            "model": "qwen_coder", "messages": [{"role": "user", "content": f"weather {marker}"}], "tools": [TOOL],
            "tool_choice": choice, **own})
        assert response.status_code == 200, response.text
        sent.append(upstream_body(fake_upstream, marker).get("frequency_penalty"))
    assert sent == [penalty, 0.0]


def test_completion_body_reaches_the_upstream(fake_server, fake_upstream):
    marker = uuid.uuid4().hex
    answer = requests.post(fake_server.url + COMPLETIONS, timeout=10, json={
        "model": "mistral_balanced", "prompt": f"once upon {marker}", "logprobs": 2, "echo": False,
        "seed": 9}).json()
    assert answer["model"] == "mistral_balanced" and answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == f"echo: once upon {marker}"
    assert upstream_body(fake_upstream, marker) == {
        "model": "echo", "prompt": f"once upon {marker}", "logprobs": 2, "echo": False, "seed": 9, "n": 1,
        "stream": False, "priority": 0, **sampling_defaults("mistral_balanced")}


def test_streaming_front_priority(fake_config, fake_upstream, start_server):
    streaming = start_server("streaming", fake_config)
    markers = [uuid.uuid4().hex, uuid.uuid4().hex]
    for marker, extra in zip(markers, ({}, {"priority": 5})):
        response = requests.post(streaming.url + CHAT, timeout=10, json={
            "model": "phi4_fast", "messages": [{"role": "user", "content": marker}], **extra})
        assert response.status_code == 200 and response.json()["model"] == "phi4_fast"
    # the streaming tier (-10, each tier 2001 points wide), then the client's own priority within it
    assert [upstream_body(fake_upstream, marker)["priority"] for marker in markers] == [-20010, -20005]


# ---------------------------------------------------------------- every error status is counted


def http_error_counts(server) -> tuple[dict[str, float], dict[str, int]]:
    """capibara_http_errors_total by status from /metrics, and /stats' http_errors."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    metric = {sample.labels["status"]: sample.value
              for family in text_string_to_metric_families(text) if family.name == "capibara_http_errors"
              for sample in family.samples if sample.name == "capibara_http_errors_total"}
    return metric, server.stats()["http_errors"]


def assert_counted(before, after, status: str, times: int = 1) -> None:
    for was, now in zip(before, after):
        assert now.get(status, 0) - was.get(status, 0) == times, (before, after)


def test_upstream_5xx_is_counted(fake_server):
    before = http_error_counts(fake_server)
    response = requests.post(fake_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": [{"role": "user", "content": "boom [[status=500]]"}]})
    assert_error(response, 502, code="upstream_error")
    assert_counted(before, http_error_counts(fake_server), "502")


def test_failing_expert_is_counted_before_and_after_the_stream_starts(tmp_path, start_server, fake_upstream):
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    fake_engine(config, 1, "echo[[fail]]")
    failing = config["experts"][1]["id"]
    server = start_server("standard", write_config(path, config))
    body = {"model": failing, "messages": USER}

    before = http_error_counts(server)
    assert_error(requests.post(server.url + CHAT, json=body, timeout=10), 502, code="upstream_error")
    middle = http_error_counts(server)
    assert_counted(before, middle, "502")

    response = requests.post(server.url + CHAT, json={**body, "stream": True}, timeout=10)
    assert response.status_code == 200
    events = read_sse(response)
    assert events[0]["choices"][0]["delta"]["content"] == "echo:"
    assert events[-2]["error"]["code"] == "upstream_error" and events[-1] == "[DONE]"
    assert_counted(middle, http_error_counts(server), "502")
    assert server.stats()["experts"][failing]["errors"] == 2
