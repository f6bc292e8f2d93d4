"""Generation on the real vLLM engine with the embedded SmolLM2 model, through the OpenAI Python client
and over real sockets: chat and text completions, sampling options, the expert's own prompt and defaults.
Lazy loading, memory and failed loads are in test_model_host.py."""
import openai
import pytest
import requests

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_naming_an_expert(client):
    """Greedy text differs from one CPU to the next, so: an answer, the same one twice, with honest counts."""
    response = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=64)
    again = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=64)
    assert response.model == "phi4_fast"
    assert response.choices[0].message.content.strip()
    assert response.choices[0].message.content == again.choices[0].message.content
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
    full = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=32)
    words = full.choices[0].message.content.split()
    assert len(words) >= 3, full.choices[0].message.content
    stop = " " + words[2]  # whatever this CPU's greedy answer says third, the answer must end before it
    stopped = client.chat.completions.create(model="phi4_fast", messages=FRANCE, temperature=0, max_tokens=32,
                                             stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert full.choices[0].message.content.startswith(stopped.choices[0].message.content)
    assert stop not in stopped.choices[0].message.content
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


def test_the_expert_system_prompt_shapes_the_answer(vllm_server):
    """Experts sharing one runner still answer as themselves: the multilingual expert's prompt is applied."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24, "temperature": 0}
    answers = {}
    for model in ("phi4_fast", "aya_expanse_multilingual"):
        response = requests.post(vllm_server.url + "/v1/chat/completions", json={**body, "model": model}, timeout=120)
        assert response.status_code == 200 and response.json()["model"] == model
        answers[model] = response.json()
    assert answers["phi4_fast"]["usage"]["prompt_tokens"] != answers["aya_expanse_multilingual"]["usage"]["prompt_tokens"]
