"""Routing through the servers: no model (or "auto") goes to the fitting expert, the answer and headers say
which, the request reaches the upstream as that expert's, /v1/route explains the decision without generating,
and /stats counts decisions. Every expert is the fake upstream (tests/fake_upstream.py)."""
import base64
import json
import uuid

import pytest
import requests

from tests.conftest import EMBEDDED

EXPERTS = {expert["id"]: expert for expert in EMBEDDED["experts"]}
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@pytest.mark.parametrize("model, content, expert", [
    (None, "Write a Python function that merges two sorted lists.", "qwen_coder"),
    ("auto", "¿Cuál es la mejor época para visitar Sevilla y qué debo ver allí?", "aya_expanse_multilingual"),
    (None, "Explain how TCP congestion control reacts to packet loss.", "mistral_balanced"),
    (None, "What is a good name for a pet goldfish?", "phi4_fast"),
])
def test_no_model_is_routed(fake_server, fake_upstream, model, content, expert):
    content = f"{content} {uuid.uuid4().hex}"
    body = {"messages": [{"role": "user", "content": content}], **({"model": model} if model else {})}
    response = requests.post(fake_server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert response.json()["model"] == expert == response.headers["X-Capibara-Expert"]
    assert response.json()["choices"][0]["message"]["content"] == "echo: " + " ".join(content.split())
    assert 0 < float(response.headers["X-Capibara-Route-Score"]) <= 1
    assert response.headers["X-Capibara-Route-Reason"]
    sent = [r["body"] for r in fake_upstream.requests() if content in json.dumps(r["body"], ensure_ascii=False)]
    assert len(sent) == 1 and sent[0]["model"] == "echo"
    assert sent[0]["messages"][0] == {"role": "system", "content": EXPERTS[expert]["system_prompt"]}
    assert sent[0]["max_tokens"] == EXPERTS[expert]["sampling"]["max_tokens"]


def test_route_explains_without_generating(fake_server, fake_upstream):
    before = fake_server.stats()["experts"]["qwen_coder"]["requests"]
    upstream_before = len(fake_upstream.requests())
    body = {"messages": [{"role": "user", "content": "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 1"}]}
    decision = requests.post(fake_server.url + "/v1/route", json=body, timeout=10).json()
    assert decision["expert"] == "qwen_coder" and decision["ranking"][0] == "qwen_coder"
    assert set(decision["scores"]) == {"phi4_fast", "mistral_balanced", "qwen_coder", "gemma3_multimodal",
                                       "aya_expanse_multilingual"}
    assert decision["reason"] and decision["stage"] == "rules" and decision["elapsed_ms"] < 50
    prompt = requests.post(fake_server.url + "/v1/route", json={"prompt": "def add(a, b): return a + b"},
                           timeout=10).json()
    assert prompt["expert"] == "qwen_coder"
    assert fake_server.stats()["experts"]["qwen_coder"]["requests"] == before
    assert len(fake_upstream.requests()) == upstream_before
    stats = fake_server.stats()["routing"]
    assert stats["decisions"]["qwen_coder"] >= 1 and stats["latency_ms"]["p99"] is not None


def test_route_says_what_decided(fake_server):
    """The stage: "rules" when a structural signal decided, "tfidf" when the classifier did."""
    def route(content: str) -> dict:
        body = {"messages": [{"role": "user", "content": content}]}
        return requests.post(fake_server.url + "/v1/route", json=body, timeout=10).json()

    classifier = route("Explain how TCP congestion control reacts to packet loss.")
    assert (classifier["expert"], classifier["reason"], classifier["stage"]) == ("mistral_balanced", "classifier",
                                                                                 "tfidf")
    foreign = route("¿Cuál es la mejor época para visitar Sevilla y qué debo ver allí?")
    assert (foreign["expert"], foreign["stage"]) == ("aya_expanse_multilingual", "rules")


def test_image_goes_to_the_multimodal_expert_which_says_it_cannot_read_it(fake_server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                      {"type": "image_url", "image_url": {"url": PNG}}]}]}
    response = requests.post(fake_server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "images_not_supported" and "gemma3_multimodal" in error["message"]
    decision = requests.post(fake_server.url + "/v1/route", json=body, timeout=10).json()
    assert decision["expert"] == "gemma3_multimodal" and decision["reason"] == "image content"
    assert decision["stage"] == "rules"
