"""Load on the real vLLM engine: 64 concurrent streams with a quarter of the clients leaving mid-stream, and 16
concurrent consensus requests.

Every stream that runs to its end is well-formed and ends with [DONE]. Afterwards nothing is left in flight in the
engine or in the server, so the streams of the clients that left were aborted, not left running. Memory returns to
within 10 % of its level before the run; it is measured after a warm-up run, so allocator growth is not counted.
/health answers within a few seconds all the while. Every consensus request gets a 200 with a consensus object.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import requests

from bench.bench_load import StreamResult, chat_body, stream_chat
from core.config import load_config
from core.protocol import ChatMessage
from core.router import Router
from tests.conftest import Server, make_config, write_config

EXPERT = "qwen_coder"
STREAMS = 64
MAX_TOKENS = 16
LEAVE_AFTER_EVENTS = 2  # a leaving client reads two chunks (two tokens), then closes the connection
PROBE_LIMIT_S = 4.0
CONSENSUS_REQUESTS = 16
QUESTION = "What is the capital of France?"


class HealthProbe:
    """Polls /health from a thread until stopped; keeps every probe's status and answer time (status 0: no answer)."""

    def __init__(self, url: str):
        self.url = url
        self.probes: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(PROBE_LIMIT_S + 1)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = requests.get(self.url + "/health", timeout=PROBE_LIMIT_S).status_code
            except requests.RequestException:
                status = 0
            self.probes.append((status, time.monotonic() - started))
            self._stop.wait(0.25)

    def assert_answered_throughout(self, minimum: int) -> None:
        """Every probe got a 200 within the limit, and there were enough of them to cover the whole run."""
        slow = [p for p in self.probes if p[0] != 200 or p[1] >= PROBE_LIMIT_S]
        assert len(self.probes) >= minimum and not slow, (len(self.probes), slow)


def wait_idle(server: Server, timeout: float = 60.0) -> dict:
    """/stats once no expert has a request, a queued request, engine work or an open stream."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        busy = {k: v for k, v in stats["experts"].items()
                if v["active_requests"] or v["queued_requests"] or v["engine_in_flight"]}
        if not busy and stats["active_streams"] == 0:
            return stats
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {busy}, streams {stats['active_streams']}"
        time.sleep(0.2)


def check_stream(result: StreamResult) -> str:
    """A finished stream in OpenAI's shape: one id, the role first, one finish reason at the end, [DONE]; its text."""
    assert result.status == 200 and result.events[-1] == b"[DONE]", (result.status, result.events[-3:])
    chunks = [json.loads(e) for e in result.events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in choices[1:])
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] in ("stop", "length")
    assert len(chunks) <= MAX_TOKENS + 2
    return "".join(c["delta"].get("content", "") for c in choices)


async def run_streams(url: str) -> list[StreamResult]:
    """STREAMS concurrent streaming clients; every fourth leaves after LEAVE_AFTER_EVENTS events."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(
            stream_chat(session, url, chat_body(i, MAX_TOKENS, EXPERT), LEAVE_AFTER_EVENTS if i % 4 == 3 else None)
            for i in range(STREAMS)))


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory) -> Iterator[Server]:
    """A streaming server with qwen_coder on vLLM (warm) able to take all the streams at once; the rest scripted."""
    tmp = tmp_path_factory.mktemp("load-streaming")
    path, config = make_config(tmp, warmup=[EXPERT])
    for expert in config["experts"]:
        if expert["id"] == EXPERT:
            expert.update(max_concurrency=STREAMS, max_queue=STREAMS)
            expert["engine"]["max_num_seqs"] = 32
        else:
            expert.update(model="scripted", engine={"kind": "test"})
    server = Server("streaming", write_config(path, config), tmp / "streaming.log").wait_healthy()
    try:
        server.wait_state(EXPERT, "ready", timeout=600)
        yield server
    finally:
        server.stop()


def test_64_streams_with_a_quarter_leaving_mid_stream(streaming_server):
    """The warm-up is the same workload, so the allocator has reached its working size before memory is measured."""
    server = streaming_server
    warm_up = asyncio.run(run_streams(server.url))
    assert all(r.complete or r.disconnected for r in warm_up)
    tokens_before = wait_idle(server)["experts"][EXPERT]["completion_tokens"]
    before = server.rss_bytes()

    started = time.monotonic()
    with HealthProbe(server.url) as health:
        results = asyncio.run(run_streams(server.url))
    elapsed = time.monotonic() - started

    left = [r for r in results if r.disconnected]
    finished = [r for r in results if not r.disconnected]
    assert len(left) == STREAMS // 4 and len(finished) == STREAMS - STREAMS // 4
    assert all(len(r.events) == LEAVE_AFTER_EVENTS and r.events[-1] != b"[DONE]" for r in left)
    texts = [check_stream(r) for r in finished]
    assert all(text.strip() for text in texts)
    health.assert_answered_throughout(minimum=int(elapsed / (PROBE_LIMIT_S + 0.25)))

    stats = wait_idle(server)["experts"][EXPERT]  # nothing left running: the streams that lost their client ...
    assert stats["requests"] == 2 * STREAMS
    generated = stats["completion_tokens"] - tokens_before  # ... were aborted, not written to the end unseen
    assert generated <= len(finished) * MAX_TOKENS + len(left) * MAX_TOKENS // 2, generated
    after = server.rss_bytes()
    assert abs(after - before) <= 0.10 * before, (before, after)
    assert server.health()["experts"][EXPERT] == {"state": "ready", "error": None}


@pytest.fixture(scope="module")
def consensus_server(tmp_path_factory) -> Iterator[tuple[Server, tuple[str, ...]]]:
    """A consensus server whose three candidates for QUESTION are on vLLM and warm; returns it and them."""
    tmp = tmp_path_factory.mktemp("load-consensus")
    path, config = make_config(tmp, max_loaded_experts=3)
    top = Router.from_config(load_config(path)).route((ChatMessage(role="user", text=QUESTION),)).ranking()[:3]
    config["server"]["warmup"] = list(top)
    config["consensus"].update(experts_per_request=3, candidate_max_tokens=8, candidate_timeout_s=300)
    for expert in config["experts"]:
        expert.update(max_concurrency=CONSENSUS_REQUESTS, max_queue=CONSENSUS_REQUESTS)
        expert["engine"]["max_num_seqs"] = CONSENSUS_REQUESTS
    server = Server("consensus", write_config(path, config), tmp / "consensus.log").wait_healthy()
    try:
        for expert in top:
            server.wait_state(expert, "ready", timeout=600)
        yield server, top
    finally:
        server.stop()


async def ask_consensus(url: str, count: int) -> list[tuple[int, dict]]:
    """`count` identical requests without a model at once: each one fans out to the same three experts."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one() -> tuple[int, dict]:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                return response.status, await response.json()
        return await asyncio.gather(*(one() for _ in range(count)))


def test_16_concurrent_consensus_requests(consensus_server):
    """48 candidate answers and 16 syntheses on three engines that step one at a time: none may fail or time out."""
    server, top = consensus_server
    with HealthProbe(server.url) as health:
        answers = asyncio.run(ask_consensus(server.url, CONSENSUS_REQUESTS))
    for status, body in answers:
        assert status == 200, body
        consensus = body["consensus"]
        assert consensus["method"] == "synthesis" and body["model"] == consensus["synthesizer"] == top[0]
        assert [e["id"] for e in consensus["experts"]] == list(top) and all(e["ok"] for e in consensus["experts"])
        assert body["choices"][0]["message"]["content"].strip()
    health.assert_answered_throughout(minimum=1)
    stats = wait_idle(server)
    assert stats["consensus"]["requests"] == CONSENSUS_REQUESTS
