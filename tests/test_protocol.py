"""The OpenAI protocol over real sockets, on the deterministic test engine: every bad-input class
gets a 4xx in OpenAI's error shape, and the server stays healthy; responses and chunks have OpenAI's shape."""
import base64
import json

import pytest
import requests

from tests.conftest import make_config

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello there"}]

BAD_CHAT = [
    ({"messages": USER, "model": "nope"}, 404, "model", "model_not_found"),
    ({}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": "hi"}, 400, "messages", None),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages", None),
    ({"messages": ["hi"]}, 400, "messages[0]", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     400, "messages[0].content[0]", "invalid_image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]},
     400, "messages[0].content[0]", "invalid_image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a").decode()}}]}]},
     400, "messages[0].content[0]", "invalid_image"),
    ({"messages": USER, "model": 7}, 400, "model", None),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature", None),
    ({"messages": USER, "temperature": 3}, 400, "temperature", None),
    ({"messages": USER, "top_p": 0}, 400, "top_p", None),
    ({"messages": USER, "top_k": -5}, 400, "top_k", None),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", None),
    ({"messages": USER, "max_tokens": True}, 400, "max_tokens", None),
    ({"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens", None),
    ({"messages": USER, "max_tokens": 10 ** 30}, 400, "max_tokens", None),
    ({"messages": USER, "n": 0}, 400, "n", None),
    ({"messages": USER, "n": 1000}, 400, "n", None),
    ({"messages": USER, "stop": 5}, 400, "stop", None),
    ({"messages": USER, "stop": ["ok", 3]}, 400, "stop", None),
    ({"messages": USER, "stop": [""]}, 400, "stop", None),
    ({"messages": USER, "seed": "abc"}, 400, "seed", None),
    ({"messages": USER, "presence_penalty": 9}, 400, "presence_penalty", None),
    ({"messages": USER, "frequency_penalty": "x"}, 400, "frequency_penalty", None),
    ({"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    ({"messages": USER, "stream": "yes"}, 400, "stream", None),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": "y"}}, 400,
     "stream_options.include_usage", None),
]

BAD_COMPLETIONS = [
    ({}, 400, "prompt"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"prompt": ["a"] * 17}, 400, "prompt"),
    ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
]


def assert_error(response: requests.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body, status, param, code", BAD_CHAT)
def test_bad_chat_requests(scripted_server, body, status, param, code):
    assert_error(requests.post(scripted_server.url + CHAT, json=body, timeout=10), status, param, code)


@pytest.mark.parametrize("body, status, param", BAD_COMPLETIONS)
def test_bad_completion_requests(scripted_server, body, status, param):
    assert_error(requests.post(scripted_server.url + COMPLETIONS, json=body, timeout=10), status, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"", b'{"messages": "\xff\xfe"}',
                                 b'{"messages": [' * 5000])
def test_undecodable_bodies(scripted_server, raw):
    response = requests.post(scripted_server.url + CHAT, data=raw, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert_error(response, 400)


def test_unknown_route_and_method(scripted_server):
    assert_error(requests.get(scripted_server.url + "/v1/nothing", timeout=10), 404)
    assert_error(requests.get(scripted_server.url + CHAT, timeout=10), 405)


def test_image_to_text_only_expert_names_the_expert(scripted_server):
    body = {"model": "phi4_fast", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]}
    error = assert_error(requests.post(scripted_server.url + CHAT, json=body, timeout=10), 400,
                         code="images_not_supported")
    assert "phi4_fast" in error["message"]


def test_server_healthy_after_bad_input(scripted_server):
    for body, *_ in BAD_CHAT:
        requests.post(scripted_server.url + CHAT, json=body, timeout=10)
    assert scripted_server.health()["status"] == "ok"
    assert scripted_server.stats()["client_errors"]["400"] >= len(BAD_CHAT) - 1
    ok = requests.post(scripted_server.url + CHAT, json={"model": "phi4_fast", "messages": USER}, timeout=10)
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(tmp_path, start_server):
    path, config = make_config(tmp_path, engine="test", max_body_bytes=4096)
    server = start_server("standard", path)
    body = {"model": "phi4_fast", "messages": [{"role": "user", "content": "x" * 10000}]}
    assert_error(requests.post(server.url + CHAT, json=body, timeout=10), 413)
    assert server.health()["status"] == "ok"


def test_chat_response_shape(scripted_server):
    response = requests.post(scripted_server.url + CHAT, timeout=10, json={
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


def test_max_tokens_and_stop(scripted_server):
    long = [{"role": "user", "content": "one two three four five six"}]
    body = requests.post(scripted_server.url + CHAT, timeout=10,
                         json={"model": "phi4_fast", "messages": long, "max_tokens": 3}).json()
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "echo: one two"},
                                  "logprobs": None, "finish_reason": "length"}
    body = requests.post(scripted_server.url + CHAT, timeout=10,
                         json={"model": "phi4_fast", "messages": long, "stop": [" four", "zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == "echo: one two three"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_with_prompt_list(scripted_server):
    body = requests.post(scripted_server.url + COMPLETIONS, timeout=10, json={
        "model": "phi4_fast", "prompt": ["a b", "c d e"], "n": 2}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    texts = [(c["index"], c["text"]) for c in body["choices"]]
    assert texts == [(0, "echo: a b"), (1, "echo: a b"), (2, "echo: c d e"), (3, "echo: c d e")]


def read_sse(response: requests.Response) -> list:
    assert response.headers["Content-Type"] == "text/event-stream"
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_stream_chunks_and_usage(scripted_server):
    response = requests.post(scripted_server.url + CHAT, timeout=10, json={
        "model": "phi4_fast", "messages": USER, "stream": True, "n": 2,
        "stream_options": {"include_usage": True}})
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
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


def test_completion_stream(scripted_server):
    response = requests.post(scripted_server.url + COMPLETIONS, timeout=10, json={
        "model": "phi4_fast", "prompt": "x y", "stream": True})
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "echo: x y"


def test_error_after_stream_start_is_an_sse_error(scripted_server):
    response = requests.post(scripted_server.url + CHAT, timeout=10, json={
        "model": "mistral_balanced", "stream": True, "messages": [{"role": "user", "content": "a [[fail]] b"}]})
    assert response.status_code == 200
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_failed"
    assert events[0]["choices"][0]["delta"]["content"] == "echo:"


def test_error_before_stream_start_is_json(scripted_server):
    response = requests.post(scripted_server.url + CHAT, timeout=10, json={
        "model": "nope", "stream": True, "messages": USER})
    assert_error(response, 404, "model", "model_not_found")


def test_api_key(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test")
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
