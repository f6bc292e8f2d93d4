"""The consensus server (8084) over real sockets. The fan-out, timeouts, faults, fallbacks and priorities run on the
fake upstream, whose delays and faults are known: each expert is pointed at one of its models ("echo[[hang]]" always
hangs, "echo[[delay=0.1]]" takes 0.1 s a token). One test runs on the real vLLM engine."""
import base64
import time

import openai
import pytest
import requests

from core.config import load_config
from core.front.consensus import SYNTHESIS_PROMPT, agreement, medoid
from core.protocol import ChatMessage
from core.router import Router
from tests.conftest import FAKE_MODELS, FakeUpstream, fake_engine, make_config, write_config

PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
ECHO = "echo: " + PROMPT
TOKENS = len(ECHO.split())  # the fake upstream writes one word per token
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
# The fake upstream of this module: the session's models and a few known per-token delays.
MODELS = (*FAKE_MODELS, "echo[[delay=0.02]]", "echo[[delay=0.1]]", "echo[[delay=0.2]]", "echo[[delay=0.3]]")
# What the runner gets for the defaults of server.priorities (tiers 10 and 0): the tier times 2001, plus the client's.
CANDIDATE_PRIORITY, STANDARD_PRIORITY = 10 * 2001, 0


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream(models=MODELS)
    yield fake
    fake.process.kill()  # its hung handlers ("echo[[hang]]") would hold a graceful stop for a minute
    fake.process.wait(10)


def ranking(path, text: str = PROMPT) -> tuple[str, ...]:
    """The router's ranking for a prompt, computed as the server will compute it."""
    return Router.from_config(load_config(path)).route((ChatMessage(role="user", content=text),)).ranking()


def faked(tmp_path, upstream: FakeUpstream, **consensus) -> tuple:
    """The embedded config with every expert on the fake upstream's plain "echo" model."""
    path, config = make_config(tmp_path, engine="fake", upstream=upstream.url)
    config["consensus"].update(consensus)
    return write_config(path, config), config


def set_model(config: dict, expert_id: str, model: str) -> None:
    """Point one expert at another of the fake upstream's models."""
    fake_engine(config, next(i for i, e in enumerate(config["experts"]) if e["id"] == expert_id), model)


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


# ---------------------------------------------------------------- fake upstream


def test_candidates_run_in_parallel_and_one_answer_is_synthesised(tmp_path, start_server, upstream):
    path, config = faked(tmp_path, upstream)
    top = ranking(path)
    for delay, expert in zip((0.1, 0.2, 0.3), top):
        set_model(config, expert, f"echo[[delay={delay}]]")
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


def test_candidates_go_at_the_candidate_priority_and_the_synthesis_at_the_standard_one(tmp_path, start_server,
                                                                                      upstream):
    """What the upstream received: three candidates in the candidate tier (plus the client's priority), capped and
    not streamed, each with its expert's system prompt; one synthesis in the standard tier (plus the client's),
    streamed if asked."""
    path, config = faked(tmp_path, upstream, candidate_max_tokens=5)
    top = ranking(path)
    prompts = {e["id"]: e["system_prompt"] for e in config["experts"]}
    server = start_server("consensus", path)

    def sent(**body) -> tuple[list[dict], list[dict]]:
        """The candidate and synthesis bodies the upstream received for one request."""
        seen = len(upstream.requests())
        if body.get("stream"):
            chunks = list(client(server).chat.completions.create(model="auto", messages=MESSAGES, **body))
            assert chunks[-1].model_extra["consensus"]["method"] == "synthesis"
        else:
            response = chat(server, **body)
            assert response.status_code == 200, response.text
            assert response.json()["consensus"]["method"] == "synthesis"
        bodies = [r["body"] for r in upstream.requests()[seen:] if r["path"] == "/v1/chat/completions"]
        synthesis = [b for b in bodies if SYNTHESIS_PROMPT in b["messages"][0]["content"]]
        return [b for b in bodies if b not in synthesis], synthesis

    for client_priority in (None, 3):
        extra = {} if client_priority is None else {"priority": client_priority}
        offset = client_priority or 0
        candidates, synthesis = sent(**extra)
        assert sorted(b["messages"][0]["content"] for b in candidates) == sorted(prompts[e] for e in top[:3])
        assert all(b["priority"] == CANDIDATE_PRIORITY + offset for b in candidates), candidates
        assert all(b["stream"] is False and b["n"] == 1 and b["max_tokens"] == 5 for b in candidates), candidates
        assert len(synthesis) == 1 and synthesis[0]["priority"] == STANDARD_PRIORITY + offset, synthesis
        assert not synthesis[0].get("stream") and synthesis[0]["messages"][-1] == MESSAGES[-1]

    candidates, synthesis = sent(stream=True)
    assert len(candidates) == 3 and all(b["priority"] == CANDIDATE_PRIORITY and b["stream"] is False
                                        for b in candidates)
    assert len(synthesis) == 1 and synthesis[0]["priority"] == STANDARD_PRIORITY and synthesis[0]["stream"] is True


def test_failed_and_hung_candidates_are_dropped_and_listed(tmp_path, start_server, upstream):
    path, config = faked(tmp_path, upstream, candidate_timeout_s=1.0)
    top = ranking(path)
    set_model(config, top[1], "echo[[fail]]")
    set_model(config, top[2], "echo[[hang]]")
    server = start_server("consensus", write_config(path, config))

    started = time.monotonic()
    response = chat(server)
    assert time.monotonic() - started < 3.0
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == ECHO and body["model"] == top[0]
    ok, failed, hung = body["consensus"]["experts"]
    assert ok == {"id": top[0], "ok": True, "latency_s": ok["latency_s"], "completion_tokens": TOKENS}
    assert failed["id"] == top[1] and not failed["ok"] and failed["completion_tokens"] == 0
    assert failed["error"].startswith(f"expert '{top[1]}'") and "HTTP 500: scripted failure" in failed["error"]
    assert hung["id"] == top[2] and not hung["ok"] and hung["error"] == "no answer within 1 s"
    assert "Traceback" not in response.text
    assert body["consensus"]["method"] == "synthesis" and body["consensus"]["agreement"] == 1.0
    assert server.stats()["consensus"]["failures"] == {top[1]: 1, top[2]: 1}


def test_too_few_answers_is_a_retryable_error_listing_the_failures(tmp_path, start_server, upstream):
    path, config = faked(tmp_path, upstream, candidate_timeout_s=1.0, min_successful=2)
    top = ranking(path)
    set_model(config, top[1], "echo[[fail]]")
    set_model(config, top[2], "echo[[hang]]")
    server = start_server("consensus", write_config(path, config))

    response = chat(server)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["code"] == "consensus_failed" and error["type"] == "service_unavailable_error"
    assert "needs 2 answer(s) but 1 of 3 experts answered" in error["message"]
    assert f"{top[1]}: expert '{top[1]}'" in error["message"] and "scripted failure" in error["message"]
    assert f"{top[2]}: no answer within 1 s" in error["message"]
    with pytest.raises(openai.APIStatusError) as raised:  # a stream fails the same way, before it starts
        client(server).chat.completions.create(model="auto", messages=MESSAGES, stream=True)
    assert raised.value.status_code == 503
    assert server.stats()["consensus"]["failures"] == {top[1]: 2, top[2]: 2}


@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_aggregator_failure_falls_back_to_the_medoid_candidate(tmp_path, start_server, upstream, fault):
    path, config = faked(tmp_path, upstream, candidate_timeout_s=1.0)
    top = ranking(path)
    config["consensus"]["aggregator"] = top[4]  # not a candidate, so only the synthesis fails
    set_model(config, top[4], f"echo[[{fault}]]")
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

    # Streamed: the aggregator fails before its first chunk reached the client (hang), or after its first token
    # but before that token was sent on (fail: the first chunk is held back), so the medoid still answers.
    chunks = list(client(server).chat.completions.create(model="auto", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ECHO
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].model == top[0]
    assert chunks[-1].model_extra["consensus"]["method"] == "medoid"
    assert f"aggregator '{top[4]}' failed" in chunks[-1].model_extra["consensus"]["note"]
    assert server.stats()["consensus"]["requests"] == 2


def test_image_request_goes_to_the_only_vision_expert_alone(tmp_path, start_server, upstream):
    path, config = faked(tmp_path, upstream)
    for expert in config["experts"]:  # as in production: the multimodal expert's model reads images
        expert["vision"] = expert["domain"] == "multimodal"
    vision = [e["id"] for e in config["experts"] if e["vision"]]
    server = start_server("consensus", write_config(path, config))
    image = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                          {"type": "image_url", "image_url": {"url": PNG}}]}]

    seen = len(upstream.requests())
    response = chat(server, messages=image)
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert body["model"] == consensus["synthesizer"] == vision[0] == response.headers["X-Capibara-Expert"]
    assert consensus["method"] == "single" and "images" in consensus["note"]
    assert [e["id"] for e in consensus["experts"]] == vision and consensus["experts"][0]["completion_tokens"] == TOKENS
    assert response.headers["X-Capibara-Consensus-Experts"] == vision[0]
    assert body["choices"][0]["message"]["content"] == ECHO
    sent = upstream.requests()[seen:]
    assert len(sent) == 1 and sent[0]["body"]["messages"][-1] == image[0]  # the image went to the expert as sent


def test_image_request_without_a_vision_expert_is_a_400(tmp_path, start_server, upstream):
    path, config = faked(tmp_path, upstream)
    for expert in config["experts"]:
        expert["vision"] = False
    server = start_server("consensus", write_config(path, config))
    image = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                          {"type": "image_url", "image_url": {"url": PNG}}]}]
    response = chat(server, messages=image)
    assert response.status_code == 400 and response.json()["error"]["code"] == "images_not_supported"


def test_named_model_is_served_by_that_expert_alone(tmp_path, start_server, upstream):
    path, _ = faked(tmp_path, upstream)
    expert = ranking(path)[2]
    server = start_server("consensus", path)

    seen = len(upstream.requests())
    response = chat(server, model=expert)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == expert == response.headers["X-Capibara-Expert"] and "consensus" not in body
    assert body["choices"][0]["message"]["content"] == ECHO
    stats = server.stats()
    assert {e: s["requests"] for e, s in stats["experts"].items() if s["requests"]} == {expert: 1}
    assert stats["consensus"]["requests"] == 0
    sent = upstream.requests()[seen:]
    assert len(sent) == 1 and sent[0]["body"]["priority"] == STANDARD_PRIORITY
    assert chat(server, model="nope").status_code == 404


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming_consensus_with_the_openai_client(tmp_path, start_server, upstream, include_usage):
    path, config = faked(tmp_path, upstream)
    top = ranking(path)
    set_model(config, top[0], "echo[[delay=0.02]]")
    server = start_server("consensus", write_config(path, config))

    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client(server).with_raw_response.chat.completions.create(messages=MESSAGES, model="auto", stream=True,
                                                                   **options)
    assert raw.headers["X-Capibara-Expert"] == top[0]
    chunks = list(raw.parse())
    assert all(c.object == "chat.completion.chunk" and c.model == top[0] for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert len(content) >= TOKENS  # the synthesis arrives as it is written, a token a chunk
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content or "" for c in content) == ECHO
    assert content[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    consensus = chunks[-1].model_extra["consensus"]
    assert consensus["method"] == "synthesis" and consensus["synthesizer"] == top[0]
    assert [e["id"] for e in consensus["experts"]] == list(top[:3])
    assert sum("consensus" in c.model_extra for c in chunks) == 1
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4 * TOKENS
        assert sum(c.usage is not None for c in chunks) == 1
    else:
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is None
        assert all(c.usage is None for c in chunks)


# ---------------------------------------------------------------- real engine


def test_real_engine_synthesises_an_answer_from_three_experts(vllm_consensus_server):
    """Three SmolLM2 experts answer (on the session's one warm runner), one of them synthesises."""
    server = vllm_consensus_server
    top = ranking(server.config)[:3]
    before = server.stats()["consensus"]["requests"]

    response = chat(server, timeout=600, max_tokens=32, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    consensus = body["consensus"]
    assert consensus["method"] == "synthesis" and body["model"] == consensus["synthesizer"] == top[0]
    assert response.headers["X-Capibara-Expert"] == top[0]
    assert [e["id"] for e in consensus["experts"]] == list(top)
    assert all(e["ok"] and 0 < e["completion_tokens"] <= 32 for e in consensus["experts"])
    assert body["choices"][0]["message"]["content"].strip()
    assert 0.0 <= consensus["agreement"] <= 1.0
    candidates = sum(e["completion_tokens"] for e in consensus["experts"])
    assert candidates < body["usage"]["completion_tokens"] <= candidates + 32
    assert server.stats()["consensus"]["requests"] == before + 1
