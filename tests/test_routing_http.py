"""Routing through the servers: no model (or "auto") goes to the fitting expert, the answer and headers say
which, /v1/route explains the decision without generating, and /stats counts decisions."""
import base64

import pytest
import requests

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@pytest.mark.parametrize("model, content, expert", [
    (None, "Write a Python function that merges two sorted lists.", "qwen_coder"),
    ("auto", "¿Cuál es la mejor época para visitar Sevilla y qué debo ver allí?", "aya_expanse_multilingual"),
    (None, "Explain how TCP congestion control reacts to packet loss.", "mistral_balanced"),
    (None, "What is a good name for a pet goldfish?", "phi4_fast"),
])
def test_no_model_is_routed(scripted_server, model, content, expert):
    body = {"messages": [{"role": "user", "content": content}], **({"model": model} if model else {})}
    response = requests.post(scripted_server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert response.json()["model"] == expert == response.headers["X-Capibara-Expert"]
    assert 0 < float(response.headers["X-Capibara-Route-Score"]) <= 1
    assert response.headers["X-Capibara-Route-Reason"]


def test_route_explains_without_generating(scripted_server):
    before = scripted_server.stats()["experts"]["qwen_coder"]["requests"]
    body = {"messages": [{"role": "user", "content": "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 1"}]}
    decision = requests.post(scripted_server.url + "/v1/route", json=body, timeout=10).json()
    assert decision["expert"] == "qwen_coder" and decision["ranking"][0] == "qwen_coder"
    assert set(decision["scores"]) == {"phi4_fast", "mistral_balanced", "qwen_coder", "gemma3_multimodal",
                                       "aya_expanse_multilingual"}
    assert decision["reason"] and decision["elapsed_ms"] < 50
    prompt = requests.post(scripted_server.url + "/v1/route", json={"prompt": "def add(a, b): return a + b"},
                           timeout=10).json()
    assert prompt["expert"] == "qwen_coder"
    assert scripted_server.stats()["experts"]["qwen_coder"]["requests"] == before
    stats = scripted_server.stats()["routing"]
    assert stats["decisions"]["qwen_coder"] >= 1 and stats["latency_ms"]["p99"] is not None


def test_image_goes_to_the_multimodal_expert_which_says_it_cannot_read_it(scripted_server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                      {"type": "image_url", "image_url": {"url": PNG}}]}]}
    response = requests.post(scripted_server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "images_not_supported" and "gemma3_multimodal" in error["message"]
    decision = requests.post(scripted_server.url + "/v1/route", json=body, timeout=10).json()
    assert decision["expert"] == "gemma3_multimodal" and decision["reason"] == "image content"
