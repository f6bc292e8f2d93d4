"""Remote experts: a front server relays some experts to an upstream OpenAI-compatible server over real sockets.

The upstream is a second instance of our own standard server on the scripted engine (its delays and faults are
known), or, in one test, the real vLLM engine. A small in-process upstream covers the error mapping and token
reconciliation that our own server never produces.
"""
import asyncio
import json
import socket
import time
from pathlib import Path

import openai
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import EngineOptions, ExpertConfig, load_config
from core.engines import EngineError, GenerationRequest, SamplingSettings
from core.engines.remote import RemoteEngine
from core.protocol import APIError, ChatMessage, ImagePart
from core.router import Router
from tests.conftest import EMBEDDED, REPO, Server, free_port, make_config, write_config

KEY = "k3y-for-the-upstream-9f2c"
WRONG_KEY = "not-the-key-41b7"
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
ECHO = "echo: " + PROMPT
SYSTEM = {e["id"]: e["system_prompt"] for e in EMBEDDED["experts"]}


def remote(config: dict, expert_id: str, base_url: str, remote_model: str = "phi4_fast", **options) -> None:
    """Turn one expert of a test config into a remote expert."""
    expert = next(e for e in config["experts"] if e["id"] == expert_id)
    expert["engine"] = {"kind": "remote", "base_url": base_url, "remote_model": remote_model, **options}


def upstream_config(tmp_path: Path, **engine) -> Path:
    """Our standard server's config on the scripted engine, with `engine` options for every expert."""
    path, config = make_config(tmp_path, engine="test", name="upstream.json", max_loaded_experts=5)
    for expert in config["experts"]:
        expert["engine"].update(engine)
    return write_config(path, config)


def chat(server, timeout: float = 30, **body) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=timeout)


def wait_idle(server, expert: str, timeout: float = 2.0) -> dict:
    """The expert's /stats once it holds no engine request and no stream (or as it is at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()["experts"][expert]
        if (stats["engine_in_flight"], stats["active_streams"]) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


# ---------------------------------------------------------------- a front with local and remote experts


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An upstream that requires KEY, and a front whose experts are: phi4_fast and qwen_coder remote (with the
    key), mistral_balanced local, gemma3_multimodal remote with a wrong key, aya remote with an unknown model."""
    tmp = tmp_path_factory.mktemp("remote")
    upstream = Server("standard", upstream_config(tmp), tmp / "upstream.log", {"CAPIBARA_API_KEY": KEY})
    upstream.wait_healthy()
    path, config = make_config(tmp, engine="test", name="front.json", max_loaded_experts=5)
    remote(config, "phi4_fast", upstream.url, api_key_env="UPSTREAM_KEY")
    remote(config, "qwen_coder", upstream.url + "/v1/", "qwen_coder", api_key_env="UPSTREAM_KEY")
    remote(config, "gemma3_multimodal", upstream.url, api_key_env="WRONG_UPSTREAM_KEY")
    remote(config, "aya_expanse_multilingual", upstream.url, "no_such_model", api_key_env="UPSTREAM_KEY")
    front = Server("standard", write_config(path, config), tmp / "front.log",
                   {"UPSTREAM_KEY": KEY, "WRONG_UPSTREAM_KEY": WRONG_KEY})
    front.wait_healthy()
    yield front, upstream
    front.stop()
    upstream.stop()


def upstream_chat(upstream, expert: str, **body) -> dict:
    """The upstream's own answer to what the front sends it: the expert's system prompt, then the messages."""
    messages = [{"role": "system", "content": SYSTEM[expert]}, *MESSAGES]
    response = requests.post(upstream.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": expert, "messages": messages, **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_full_response_is_the_upstream_answer(pair):
    front, upstream = pair
    response = chat(front, model="phi4_fast")
    assert response.status_code == 200, response.text
    body = response.json()
    direct = upstream_chat(upstream, "phi4_fast")
    assert body["model"] == response.headers["X-Capibara-Expert"] == "phi4_fast"
    assert body["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"] == ECHO
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == direct["usage"] and body["usage"]["prompt_tokens"] > len(PROMPT.split())

    two = chat(front, model="qwen_coder", n=2, max_tokens=3).json()  # base_url given as .../v1/ works too
    assert [c["message"]["content"] for c in two["choices"]] == ["echo: What is"] * 2
    assert [c["finish_reason"] for c in two["choices"]] == ["length"] * 2
    assert two["usage"]["completion_tokens"] == 6


def test_stream_through_the_openai_client(pair):
    front, _ = pair
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    full = client.chat.completions.create(model="phi4_fast", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="phi4_fast", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ECHO
    assert len(content) == len(ECHO.split())  # token by token, as the upstream sent them
    assert content[0].choices[0].delta.role == "assistant" and content[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_text_completions(pair):
    front, _ = pair
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    full = client.completions.create(model="phi4_fast", prompt="one two three", max_tokens=3)
    assert full.choices[0].text == "echo: one two" and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (3, 3)
    chunks = list(client.completions.create(model="phi4_fast", prompt=["one two", "three"], stream=True))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: "echo: one two", 1: "echo: three"}


def test_local_and_remote_experts_side_by_side(pair):
    front, upstream = pair
    authorized = {"Authorization": f"Bearer {KEY}"}
    requests_seen = lambda: requests.get(upstream.url + "/stats", headers=authorized,  # noqa: E731
                                         timeout=5).json()["experts"]["phi4_fast"]["requests"]
    before = requests_seen()
    assert chat(front, model="mistral_balanced").json()["choices"][0]["message"]["content"] == ECHO
    assert chat(front, model="phi4_fast").status_code == 200
    assert requests_seen() == before + 1  # only the remote expert's request went there
    models = {m["id"]: m for m in requests.get(front.url + "/v1/models", timeout=5).json()["data"]}
    assert models["mistral_balanced"]["engine"]["kind"] == "test"
    engine = models["qwen_coder"]["engine"]
    assert engine["kind"] == "remote" and engine["effective"]["base_url"] == upstream.url
    assert engine["effective"]["remote_model"] == "qwen_coder" and models["qwen_coder"]["state"] == "ready"
    stats = front.stats()["experts"]
    assert stats["phi4_fast"]["requests"] >= 1 and stats["phi4_fast"]["completion_tokens"] > 0


def test_failed_loads_name_the_cause_never_the_key(pair):
    front, _ = pair
    unknown = chat(front, model="aya_expanse_multilingual")
    assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "expert_load_failed"
    assert "'no_such_model'" in unknown.json()["error"]["message"]
    refused = chat(front, model="gemma3_multimodal")
    assert refused.status_code == 503 and "HTTP 401" in refused.json()["error"]["message"]
    health = front.health()["experts"]
    assert health["gemma3_multimodal"]["state"] == health["aya_expanse_multilingual"]["state"] == "failed"
    assert "HTTP 401" in health["gemma3_multimodal"]["error"]
    for path in ("/v1/models", "/health", "/stats", "/metrics"):
        text = requests.get(front.url + path, timeout=5).text
        assert KEY not in text and WRONG_KEY not in text, path
    assert KEY not in unknown.text + refused.text and WRONG_KEY not in unknown.text + refused.text
    log = front.tail(10_000)
    assert "HTTP 401" in log and KEY not in log and WRONG_KEY not in log


def test_upstream_rejects_requests_without_the_key(pair):
    _, upstream = pair
    assert requests.get(upstream.url + "/v1/models", timeout=5).status_code == 401  # so the front sends it


def test_client_disconnect_aborts_the_upstream_request(tmp_path, start_server):
    upstream = start_server("standard", upstream_config(tmp_path, test_token_delay_s=0.2))
    path, config = make_config(tmp_path, engine="test", name="front.json")
    remote(config, "phi4_fast", upstream.url)
    front = start_server("streaming", write_config(path, config))
    words = " ".join(f"word{i}" for i in range(60))  # 12 s of tokens
    body = json.dumps({"model": "phi4_fast", "messages": [{"role": "user", "content": words}],
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", front.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        for server in (front, upstream):
            stats = server.stats()["experts"]["phi4_fast"]
            assert (stats["engine_in_flight"], stats["active_streams"]) == (1, 1)
    for server in (front, upstream):
        stats = wait_idle(server, "phi4_fast")
        assert (stats["engine_in_flight"], stats["active_streams"], stats["active_requests"]) == (0, 0, 0)


def test_upstream_down_is_a_503_then_recovers(tmp_path, start_server):
    port = free_port()
    path, config = make_config(tmp_path, engine="test", name="front.json")
    remote(config, "phi4_fast", f"http://127.0.0.1:{port}", connect_timeout_s=2)
    front = start_server("standard", write_config(path, config))

    down = chat(front, model="phi4_fast")
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert down.json()["error"]["code"] == "expert_load_failed"
    assert f"127.0.0.1:{port}" in down.json()["error"]["message"] and "unreachable" in down.json()["error"]["message"]
    assert front.health()["experts"]["phi4_fast"]["state"] == "failed"

    upstream_path = upstream_config(tmp_path)
    upstream = start_server("standard", upstream_path, port=port)
    assert chat(front, model="phi4_fast").json()["choices"][0]["message"]["content"] == ECHO
    assert front.health()["experts"]["phi4_fast"]["state"] == "ready"

    upstream.stop()  # gone after loading: each request is a retryable 503 until it is back
    gone = chat(front, model="phi4_fast")
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "upstream_unavailable", gone.text
    start_server("standard", upstream_path, port=port)
    assert chat(front, model="phi4_fast").status_code == 200


def test_upstream_slow_is_a_504_and_the_upstream_request_is_dropped(tmp_path, start_server):
    upstream = start_server("standard", upstream_config(tmp_path))
    path, config = make_config(tmp_path, engine="test", name="front.json")
    remote(config, "phi4_fast", upstream.url, read_timeout_s=1)
    front = start_server("standard", write_config(path, config))
    assert chat(front, model="phi4_fast").status_code == 200

    started = time.monotonic()
    slow = chat(front, model="phi4_fast", messages=[{"role": "user", "content": "[[sleep=5]] hello"}])
    assert slow.status_code == 504 and time.monotonic() - started < 3
    assert slow.json()["error"]["code"] == "upstream_timeout" and slow.json()["error"]["type"] == "timeout_error"
    assert wait_idle(upstream, "phi4_fast")["engine_in_flight"] == 0  # aborted, not left sleeping
    assert chat(front, model="phi4_fast").status_code == 200  # the expert stays usable


def test_consensus_across_a_local_and_a_remote_expert(tmp_path, start_server):
    upstream = start_server("standard", upstream_config(tmp_path))
    path, config = make_config(tmp_path, engine="test", name="front.json", max_loaded_experts=5)
    config["consensus"].update(experts_per_request=2)
    top = Router.from_config(load_config(write_config(path, config))).route(
        (ChatMessage(role="user", text=PROMPT),)).ranking()
    remote(config, top[0], upstream.url)  # the best-ranked is remote, so it also writes the synthesis
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
    assert upstream.stats()["experts"]["phi4_fast"]["requests"] == 4  # candidate and synthesis, twice


def test_real_vllm_upstream(vllm_server, tmp_path, start_server):
    path, config = make_config(tmp_path, engine="test", name="front.json")
    remote(config, "phi4_fast", vllm_server.url)
    front = start_server("standard", write_config(path, config))
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    args = dict(model="phi4_fast", messages=MESSAGES, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**args)
    assert "Paris" in full.choices[0].message.content
    direct = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120).chat.completions.create(**args)
    assert full.choices[0].message.content == direct.choices[0].message.content and full.usage == direct.usage
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage == full.usage


# ---------------------------------------------------------------- the engine against an in-process upstream


def sampling(**fields) -> SamplingSettings:
    return SamplingSettings(**{"max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "top_k": -1, **fields})


def ask(content: str, **fields) -> GenerationRequest:
    return GenerationRequest("r", sampling(**fields), messages=({"role": "user", "content": content},))


@pytest.fixture
async def fake():
    """An upstream whose answer depends on the last message: a status number, "batched", "error" or "cut"."""
    seen: list[tuple[dict, str | None]] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((body, request.headers.get("Authorization")))
        content = body["messages"][-1]["content"]
        mode = content if isinstance(content, str) else content[0]["text"]
        if mode == "slow":
            await asyncio.sleep(2)
        if mode.isdigit():  # vLLM's error shape, whose code is an int
            return web.json_response({"error": {"message": f"upstream says {mode}", "type": "BadRequestError",
                                                "param": "max_tokens", "code": int(mode)}},
                                     status=int(mode), headers={"Retry-After": "7"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        await send({"choices": [{"index": 0, "delta": {"content": "Hello, "}, "finish_reason": None}]})
        if mode == "cut":
            return response
        if mode == "error":
            await send({"error": {"message": "the engine died", "type": "InternalServerError", "code": 500}})
        else:
            await send({"choices": [{"index": 0, "delta": {"content": "world"}, "finish_reason": "stop"}]})
            await send({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}})
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), seen


async def start(url: str, **options) -> RemoteEngine:
    engine = EngineOptions(kind="remote", base_url=url, remote_model=options.pop("model", "m"), **options)
    return await RemoteEngine.start(ExpertConfig(id="far", domain="d", description="d", model="m", engine=engine))


async def run(engine: RemoteEngine, request: GenerationRequest) -> list:
    return [delta async for delta in engine.generate(request)]


async def test_tokens_are_reconciled_with_the_upstream_usage(fake, monkeypatch):
    url, seen = fake
    monkeypatch.setenv("FAR_KEY", KEY)
    engine = await start(url, api_key_env="FAR_KEY")
    try:
        deltas = await run(engine, ask("batched", top_k=5, seed=3, stop=("x",), repetition_penalty=1.1))
    finally:
        await engine.shutdown()
    assert "".join(d.text for d in deltas) == "Hello, world" and sum(d.new_tokens for d in deltas) == 5
    assert deltas[-1].prompt_tokens == 9 and [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    body, authorization = seen[0]
    assert authorization == f"Bearer {KEY}" and body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["top_k"], body["seed"], body["stop"], body["repetition_penalty"]) == (5, 3, ["x"], 1.1)
    assert engine.info.effective["base_url"] == url and KEY not in json.dumps(engine.info.effective)


async def test_neutral_sampling_fields_are_left_out(fake):
    url, seen = fake
    engine = await start(url)
    try:
        await run(engine, ask("batched"))
    finally:
        await engine.shutdown()
    body, authorization = seen[0]
    assert authorization is None and not {"top_k", "seed", "stop", "repetition_penalty"} & set(body)


async def test_images_go_back_into_the_last_user_turn(fake):
    url, seen = fake
    image = ImagePart(url="data:image/png;base64,iVBORw0KGgo=", media_type="image/png")
    request = GenerationRequest("r", sampling(), images=(image,), messages=(
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "batched"}))
    engine = await start(url)
    try:
        await run(engine, request)
    finally:
        await engine.shutdown()
    assert seen[0][0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "batched"}, {"type": "image_url", "image_url": {"url": image.url}}]}]


@pytest.mark.parametrize("mode, status, code", [
    ("400", 400, None), ("429", 429, None), ("401", 502, "upstream_error"), ("404", 502, "upstream_error"),
    ("500", 502, "upstream_error"), ("503", 503, "upstream_unavailable"), ("error", 502, "upstream_error"),
    ("cut", 502, "upstream_error"), ("slow", 504, "upstream_timeout")])
async def test_upstream_errors_become_openai_errors(fake, mode, status, code):
    url, _ = fake
    engine = await start(url, read_timeout_s=0.5)
    try:
        with pytest.raises(APIError) as raised:
            await run(engine, ask(mode))
    finally:
        await engine.shutdown()
    error = raised.value
    assert (error.status, error.code) == (status, code) and engine.in_flight == 0
    if status in (400, 429):  # the client's fault: the upstream's words, status and fields
        assert error.message == f"upstream says {mode}" and error.param == "max_tokens"
        assert error.type == "BadRequestError" and error.retry_after == 7
    else:
        assert "expert 'far'" in error.message and url in error.message
    if mode == "error":
        assert "the engine died" in error.message


async def test_load_fails_with_a_clear_message(fake):
    url, _ = fake
    with pytest.raises(EngineError, match="does not serve the model 'other' \\(it lists: m\\)"):
        await start(url, model="other")
    with pytest.raises(EngineError, match="unreachable"):
        await start(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EngineError, match="NO_SUCH_VARIABLE_42"):
        await start(url, api_key_env="NO_SUCH_VARIABLE_42")


def test_the_documented_two_host_config_is_valid(tmp_path):
    block = (REPO / "docs" / "remote.md").read_text().split("```json\n", 1)[1].split("```", 1)[0]
    config = load_config(write_config(tmp_path / "two_hosts.json", json.loads(block)))
    remote_experts = {e.id: e.engine.remote_model for e in config.experts if e.engine.kind == "remote"}
    assert remote_experts == {"gemma3_multimodal": "gemma3_multimodal",
                              "aya_expanse_multilingual": "aya_expanse_multilingual"}
