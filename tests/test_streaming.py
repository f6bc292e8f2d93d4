"""Token-by-token SSE on the real vLLM engine: the OpenAI client's stream equals the full response,
chunks have OpenAI's shape, tokens arrive while generating, and a client that leaves stops the work."""
import json
import socket
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import runner_metrics

STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def client(vllm_streaming_server):
    return openai.OpenAI(base_url=vllm_streaming_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_stream_reassembles_into_the_full_response(client):
    args = dict(model="qwen_coder", messages=STORY, temperature=0, seed=11, max_tokens=48)
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == full.usage.completion_tokens
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.usage.total_tokens == full.usage.total_tokens
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.model == "qwen_coder" for c in chunks)
    assert len(content) >= full.usage.completion_tokens - 1  # one chunk per token, not batched


def test_raw_chunks_field_by_field(vllm_streaming_server):
    response = requests.post(vllm_streaming_server.url + "/v1/chat/completions", stream=True, timeout=120, json={
        "model": "qwen_coder", "messages": STORY, "max_tokens": 8, "stream": True})
    assert response.headers["Content-Type"] == "text/event-stream"
    raw = response.content.decode("utf-8")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        chunk = json.loads(event.removeprefix("data: "))
        assert {"id", "object", "created", "model", "choices"} <= set(chunk)  # vLLM adds a few fields of its own
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"].startswith("chatcmpl-")
        (choice,) = chunk["choices"]
        assert {"index", "delta", "logprobs", "finish_reason"} <= set(choice) and choice["index"] == 0
        assert chunk["model"] == "qwen_coder"
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_first_token_arrives_well_before_the_last(client):
    started = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model="qwen_coder", messages=STORY, max_tokens=64, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    first, last = arrivals[0], arrivals[-1]
    assert len(arrivals) > 30
    assert first < 0.5 * last, arrivals  # streamed as generated, not sent at the end


def test_n_choices_stream_interleaved(client):
    chunks = list(client.chat.completions.create(model="qwen_coder", messages=STORY, max_tokens=12, n=2,
                                                 temperature=0.8, seed=3, stream=True))
    indexes = [c.choices[0].index for c in chunks]
    assert set(indexes) == {0, 1}
    first_of_each = {i: next(c for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert all(c.choices[0].delta.role == "assistant" for c in first_of_each.values())
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_text_completion_stream(client):
    chunks = list(client.completions.create(model="qwen_coder", prompt="def fibonacci(n):", max_tokens=16,
                                            temperature=0, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    full = client.completions.create(model="qwen_coder", prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_multibyte_text_streams_as_valid_utf8(client):
    messages = [{"role": "user", "content": "Write three emoji and the Japanese word for thank you."}]
    chunks = list(client.chat.completions.create(model="qwen_coder", messages=messages, max_tokens=40,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "\ufffd" not in text


def runner_requests(server, expert: str) -> float:
    """Requests the expert's runner holds, by vLLM's own gauges (running plus waiting)."""
    text = runner_metrics(server, expert)
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
               for sample in family.samples)


def test_client_disconnect_aborts_the_runner_request(vllm_streaming_server):
    body = json.dumps({"model": "qwen_coder", "messages": STORY, "max_tokens": 1500, "stream": True,
                       "temperature": 0.9, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", vllm_streaming_server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 5:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the stream early: {received[-500:]!r}"
            received += chunk
        expert = vllm_streaming_server.stats()["experts"]["qwen_coder"]
        assert runner_requests(vllm_streaming_server, "qwen_coder") == 1 and expert["active_streams"] == 1
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        expert = vllm_streaming_server.stats()["experts"]["qwen_coder"]
        running = runner_requests(vllm_streaming_server, "qwen_coder")
        if running == 0 and expert["active_streams"] == 0 and expert["active_requests"] == 0:
            break
        time.sleep(0.05)
    assert (running, expert["active_streams"], expert["active_requests"]) == (0, 0, 0)


def test_stream_stats_report_ttft_and_inter_token_latency(vllm_streaming_server):
    stats = vllm_streaming_server.stats()
    expert = stats["experts"]["qwen_coder"]
    assert expert["ttft_s"]["p50"] > 0 and expert["ttft_s"]["p95"] >= expert["ttft_s"]["p50"]
    assert expert["inter_token_s"]["p50"] > 0
    assert stats["active_streams"] == 0


def test_standard_server_streams_too(vllm_server):
    client = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="phi4_fast", messages=STORY, max_tokens=8, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
