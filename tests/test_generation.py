"""Generation on the real vLLM engine with the embedded SmolLM2 model, through the OpenAI Python client
and over real sockets: chat and text completions, sampling options, lazy loading, memory, failed loads."""
import concurrent.futures
import os
import time

import openai
import pytest
import requests

from tests.conftest import MODEL_DIR, make_config, write_config

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_naming_an_expert(client):
    response = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=64)
    assert response.model == "phi4_fast"
    assert "Paris" in response.choices[0].message.content
    assert response.usage.prompt_tokens > 10 and 0 < response.usage.completion_tokens <= 64
    expected = "length" if response.usage.completion_tokens == 64 else "stop"
    assert response.choices[0].finish_reason == expected


def test_text_completion(client):
    response = client.completions.create(model="phi4_fast", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
    assert response.object == "text_completion" and response.model == "phi4_fast"
    assert response.choices[0].finish_reason in ("length", "stop") and response.choices[0].text.strip()
    assert response.usage.completion_tokens <= 8


def test_sampling_options_are_honoured(client):
    short = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, stop=[" Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    seeded = [client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=1.0, seed=7,
                                             max_tokens=16, n=2) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    assert len(seeded[0].choices) == 2


def test_prompt_longer_than_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="phi4_fast", messages=[{"role": "user", "content": "word " * 3000}])
    assert error.value.body["code"] == "context_length_exceeded"


def test_default_expert_without_model(vllm_server):
    response = requests.post(vllm_server.url + "/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 8},
                             timeout=120)
    assert response.status_code == 200
    assert response.json()["model"] == response.headers["X-Capibara-Expert"]


def test_cold_expert_loads_once_for_concurrent_requests_and_frees_memory_on_unload(vllm_server, client):
    assert vllm_server.health()["experts"]["mistral_balanced"]["state"] == "unloaded"
    before = vllm_server.rss_bytes()

    def ask(_):
        return client.chat.completions.create(model="mistral_balanced", messages=FRANCE, temperature=0,
                                              max_tokens=16)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, range(3)))
    assert all(a.model == "mistral_balanced" and a.choices[0].message.content for a in answers)
    stats = vllm_server.stats()["experts"]["mistral_balanced"]
    assert stats["loads"] == 1 and stats["requests"] == 3
    loaded = vllm_server.rss_bytes()
    assert loaded - before > 300 * 2 ** 20, (before, loaded)
    unloaded = requests.post(vllm_server.url + "/admin/experts/mistral_balanced/unload", timeout=60)
    assert unloaded.json()["state"] == "unloaded"
    after = vllm_server.rss_bytes()
    assert after - before < 0.35 * (loaded - before), (before, loaded, after)


def test_failed_real_load_then_recovery(tmp_path, start_server):
    link = tmp_path / "smollm2"
    path, config = make_config(tmp_path)
    config["experts"][4]["model"] = str(link)
    server = start_server("standard", write_config(path, config))
    body = {"model": "aya_expanse_multilingual", "messages": FRANCE, "max_tokens": 8, "temperature": 0}
    failed = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "expert_load_failed"
    assert server.health()["experts"]["aya_expanse_multilingual"]["state"] == "failed"
    os.symlink(MODEL_DIR, link)
    recovered = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert recovered.status_code == 200, recovered.text
    assert "Paris" in recovered.json()["choices"][0]["message"]["content"]


def test_idle_real_expert_is_unloaded_and_its_memory_returned(tmp_path, start_server):
    path, _ = make_config(tmp_path, idle_timeout_s=4, idle_check_interval_s=0.5)
    server = start_server("standard", path)

    def use_until_idle_unload(model: str) -> int:
        """RSS while the expert is loaded; returns once the idle reaper has unloaded it and freed its engine."""
        body = {"model": model, "messages": FRANCE, "max_tokens": 8, "temperature": 0}
        assert requests.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        loaded = server.rss_bytes()
        server.wait_state(model, "unloaded", timeout=30)  # probing /health meanwhile does not count as use
        deadline = time.monotonic() + 30
        while server.stats()["experts"][model]["unloads"] < 1:  # counted once the engine is shut down
            assert time.monotonic() < deadline, "the engine was never shut down"
            time.sleep(0.2)
        return loaded

    use_until_idle_unload("phi4_fast")  # the first load also imports vLLM and torch, which stay
    before = server.rss_bytes()
    loaded = use_until_idle_unload("qwen_coder")
    after = server.rss_bytes()
    assert loaded - before > 300 * 2 ** 20, (before, loaded)
    assert after - before < 0.35 * (loaded - before), (before, loaded, after)
    assert server.stats()["experts"]["qwen_coder"]["unloads"] == 1
