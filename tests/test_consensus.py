"""The consensus server (8084) over real sockets. The fan-out, timeouts, faults and fallbacks run on the scripted
engine, whose delays and faults are known. One test runs on the real vLLM engine."""
import base64
import time

import openai
import pytest
import requests

from core.config import load_config
from core.consensus import agreement, medoid
from core.protocol import ChatMessage
from core.router import Router
from tests.conftest import make_config, write_config

PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
ECHO = "echo: " + PROMPT
TOKENS = len(ECHO.split())  # the scripted engine writes one word per token
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()


def ranking(path, text: str = PROMPT) -> tuple[str, ...]:
    """The router's ranking for a prompt, computed as the server will compute it."""
    return Router.from_config(load_config(path)).route((ChatMessage(role="user", text=text),)).ranking()


def scripted(tmp_path, **consensus) -> tuple:
    """The embedded config on the scripted engine with every expert loadable at once."""
    path, config = make_config(tmp_path, engine="test", max_loaded_experts=5)
    config["consensus"].update(consensus)
    return path, config


def set_engine(config: dict, expert_id: str, **options) -> None:
    next(e for e in config["experts"] if e["id"] == expert_id)["engine"].update(options)


def chat(server, timeout: float = 60, **body) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=timeout)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


# ---------------------------------------------------------------- agreement


def test_agreement_and_medoid_by_tfidf_similarity():
    assert agreement(["only one"]) == 1.0
    assert agreement(["Paris is the capital", "Paris is the capital"]) == pytest.approx(1.0)
    assert agreement(["Paris is the capital", "bananas are yellow"]) == 0.0
    assert medoid(["bananas are yellow fruit", "Paris is the capital of France", "the capital of France is Paris",
                   "France has Paris as its capital city"]) in (1, 2)
    assert medoid(["same", "same"]) == 0 and agreement(["", ""]) == 0.0


# ---------------------------------------------------------------- scripted engine


def test_candidates_run_in_parallel_and_one_answer_is_synthesised(tmp_path, start_server):
    path, config = scripted(tmp_path)
    top = ranking(path)
    for delay, expert in zip((0.1, 0.2, 0.3), top):
        set_engine(config, expert, test_token_delay_s=delay)
    server = start_server("consensus", write_config(path, config))

    started = time.monotonic()
    response = chat(server)
    wall = time.monotonic() - started

    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == ECHO
    assert body["model"] == consensus["synthesizer"] == top[0] == response.headers["X-Capibara-Expert"]
    assert response.headers["X-Capibara-Consensus-Experts"] == ",".join(top[:3])
    assert [e["id"] for e in consensus["experts"]] == list(top[:3])
    assert all(e["ok"] and e["completion_tokens"] == TOKENS and "error" not in e for e in consensus["experts"])
    assert consensus["method"] == "synthesis" and consensus["agreement"] == 1.0 and "note" not in consensus
    assert body["usage"]["completion_tokens"] == 4 * TOKENS  # three candidates and the synthesis

    slowest, synthesis = 0.3 * TOKENS, 0.1 * TOKENS
    serial = (0.1 + 0.2 + 0.3) * TOKENS + synthesis
    assert slowest + synthesis - 0.05 <= wall < 0.75 * serial, (wall, serial)
    latencies = [e["latency_s"] for e in consensus["experts"]]
    assert max(latencies) <= consensus["fanout_s"] < 0.75 * sum(latencies)

    stats = server.stats()
    assert stats["consensus"]["requests"] == 1 and stats["consensus"]["mean_experts_used"] == 3
    assert stats["consensus"]["failures"] == {}
    assert [stats["experts"][e]["requests"] for e in top] == [2, 1, 1, 0, 0]


def test_failed_and_hung_candidates_are_dropped_and_listed(tmp_path, start_server):
    path, config = scripted(tmp_path, candidate_timeout_s=1.0)
    top = ranking(path)
    set_engine(config, top[1], test_fault="fail")
    set_engine(config, top[2], test_fault="hang")
    server = start_server("consensus", write_config(path, config))

    started = time.monotonic()
    response = chat(server)
    assert time.monotonic() - started < 3.0
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == ECHO and body["model"] == top[0]
    ok, failed, hung = body["consensus"]["experts"]
    assert ok == {"id": top[0], "ok": True, "latency_s": ok["latency_s"], "completion_tokens": TOKENS}
    assert failed["id"] == top[1] and not failed["ok"] and "failed while generating" in failed["error"]
    assert hung["id"] == top[2] and not hung["ok"] and hung["error"] == "no answer within 1 s"
    assert "Traceback" not in response.text
    assert body["consensus"]["method"] == "synthesis" and body["consensus"]["agreement"] == 1.0
    assert server.stats()["consensus"]["failures"] == {top[1]: 1, top[2]: 1}


def test_too_few_answers_is_a_retryable_error_listing_the_failures(tmp_path, start_server):
    path, config = scripted(tmp_path, candidate_timeout_s=1.0, min_successful=2)
    top = ranking(path)
    set_engine(config, top[1], test_fault="fail")
    set_engine(config, top[2], test_fault="hang")
    server = start_server("consensus", write_config(path, config))

    response = chat(server)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["code"] == "consensus_failed" and error["type"] == "service_unavailable_error"
    assert f"{top[1]}: expert '{top[1]}' failed while generating" in error["message"]
    assert f"{top[2]}: no answer within 1 s" in error["message"]
    with pytest.raises(openai.APIStatusError) as raised:  # a stream fails the same way, before it starts
        client(server).chat.completions.create(model="auto", messages=MESSAGES, stream=True)
    assert raised.value.status_code == 503


@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_aggregator_failure_falls_back_to_the_medoid_candidate(tmp_path, start_server, fault):
    path, config = scripted(tmp_path, candidate_timeout_s=1.0)
    top = ranking(path)
    config["consensus"]["aggregator"] = top[4]  # not a candidate, so only the synthesis fails
    set_engine(config, top[4], test_fault=fault)
    server = start_server("consensus", write_config(path, config))

    response = chat(server)
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert consensus["method"] == "medoid" and consensus["synthesizer"] == top[0] == body["model"]
    assert response.headers["X-Capibara-Expert"] == top[0]
    assert f"aggregator '{top[4]}' failed" in consensus["note"]
    assert all(e["ok"] for e in consensus["experts"]) and body["choices"][0]["message"]["content"] == ECHO
    assert body["usage"]["completion_tokens"] == 3 * TOKENS

    chunks = list(client(server).chat.completions.create(model="auto", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ECHO
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].model == top[0]
    assert chunks[-1].model_extra["consensus"]["method"] == "medoid"
    assert server.stats()["consensus"]["requests"] == 2


def test_image_request_goes_to_the_only_vision_expert_alone(tmp_path, start_server):
    path, config = scripted(tmp_path)
    for expert in config["experts"]:  # as in production: the multimodal expert's model reads images
        expert["vision"] = expert["domain"] == "multimodal"
    vision = [e["id"] for e in config["experts"] if e["vision"]]
    server = start_server("consensus", write_config(path, config))
    image = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                          {"type": "image_url", "image_url": {"url": PNG}}]}]

    response = chat(server, messages=image)
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert body["model"] == consensus["synthesizer"] == vision[0] == response.headers["X-Capibara-Expert"]
    assert consensus["method"] == "single" and "images" in consensus["note"]
    assert [e["id"] for e in consensus["experts"]] == vision and consensus["experts"][0]["completion_tokens"] == TOKENS
    assert response.headers["X-Capibara-Consensus-Experts"] == vision[0]
    assert body["choices"][0]["message"]["content"] == ECHO


def test_image_request_without_a_vision_expert_is_a_400(tmp_path, start_server):
    path, config = scripted(tmp_path)
    for expert in config["experts"]:
        expert["vision"] = False
    server = start_server("consensus", write_config(path, config))
    image = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                          {"type": "image_url", "image_url": {"url": PNG}}]}]
    response = chat(server, messages=image)
    assert response.status_code == 400 and response.json()["error"]["code"] == "images_not_supported"


def test_named_model_is_served_by_that_expert_alone(tmp_path, start_server):
    path, _ = scripted(tmp_path)
    expert = ranking(path)[2]
    server = start_server("consensus", path)

    response = chat(server, model=expert)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == expert == response.headers["X-Capibara-Expert"] and "consensus" not in body
    stats = server.stats()
    assert {e: s["requests"] for e, s in stats["experts"].items() if s["requests"]} == {expert: 1}
    assert stats["consensus"]["requests"] == 0
    assert chat(server, model="nope").status_code == 404


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming_consensus_with_the_openai_client(tmp_path, start_server, include_usage):
    path, config = scripted(tmp_path)
    top = ranking(path)
    set_engine(config, top[0], test_token_delay_s=0.02)
    server = start_server("consensus", write_config(path, config))

    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client(server).with_raw_response.chat.completions.create(messages=MESSAGES, model="auto", stream=True,
                                                                   **options)
    assert raw.headers["X-Capibara-Expert"] == top[0]
    chunks = list(raw.parse())
    assert all(c.object == "chat.completion.chunk" and c.model == top[0] for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content or "" for c in content) == ECHO
    assert content[-1].choices[0].finish_reason == "stop"
    consensus = chunks[-1].model_extra["consensus"]
    assert consensus["method"] == "synthesis" and consensus["synthesizer"] == top[0]
    assert [e["id"] for e in consensus["experts"]] == list(top[:3])
    assert sum("consensus" in c.model_extra for c in chunks) == 1
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4 * TOKENS
    else:
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is None


# ---------------------------------------------------------------- real engine


def test_real_engine_synthesises_an_answer_from_three_experts(tmp_path, start_server):
    """Three SmolLM2 experts answer, one of them synthesises. The experts are warmed first, so timing is stable."""
    path, config = make_config(tmp_path, max_loaded_experts=3)
    top = ranking(path)[:3]
    config["server"]["warmup"] = list(top)
    config["consensus"].update(experts_per_request=3, candidate_max_tokens=32, candidate_timeout_s=300)
    server = start_server("consensus", write_config(path, config))
    for expert in top:
        server.wait_state(expert, "ready", timeout=600)

    response = chat(server, timeout=600, max_tokens=32, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert consensus["method"] == "synthesis" and body["model"] == consensus["synthesizer"] == top[0]
    assert [e["id"] for e in consensus["experts"]] == list(top)
    assert all(e["ok"] and 0 < e["completion_tokens"] <= 32 for e in consensus["experts"])
    assert body["choices"][0]["message"]["content"].strip()
    assert 0.0 <= consensus["agreement"] <= 1.0
    candidates = sum(e["completion_tokens"] for e in consensus["experts"])
    assert candidates < body["usage"]["completion_tokens"] <= candidates + 32
