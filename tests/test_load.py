"""Load: 64 concurrent streams with a quarter of the clients leaving mid-stream, admission under a burst, and 16
concurrent consensus requests. Each runs on the fake upstream, whose timing is known; the stream and consensus loads
also run on the real vLLM engine (the session's shared runner).

Every stream that runs to its end is well-formed and ends with [DONE]. Afterwards nothing is left in flight in the
server, the model host or the upstream, so the streams of the clients that left were aborted, not left running.
Memory returns to within 10 % of its level before the run; it is measured after a warm-up run, so allocator growth
is not counted. /health answers within a few seconds all the while. Every consensus request gets a 200 with a
consensus object. A burst beyond an expert's concurrency and queue gets exactly the admitted count through and a
retryable 429 for the rest.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import requests

from core.harness.load import StreamResult, chat_body, stream_chat
from core.config import load_config
from core.protocol import ChatMessage
from core.router import Router
from tests.conftest import FakeUpstream, Server, fake_engine, make_config, process_tree, process_pss, write_config

EXPERT = "qwen_coder"
STREAMS = 64
MAX_TOKENS = 16
LEAVE_AFTER_EVENTS = 2  # a leaving client reads two chunks (two tokens), then closes the connection
PROBE_LIMIT_S = 4.0
CONSENSUS_REQUESTS = 16
QUESTION = "What is the capital of France?"
# The fake upstream: a finishing stream takes 0.02 s a token; a leaving one 0.5 s a token, so that, were it not
# closed upstream when its client leaves (after two tokens, about 1 s), it would stay open some 7 s longer.
FAST_DELAY_S, LEAVER_DELAY_S = 0.02, 0.5
SLOW_MODEL = "echo[[delay=0.02]]"
# Admission: an expert that admits 4 at once and queues 4, and a burst of 32 that each hold their slot 2 s.
ADMISSION_EXPERT, ADMISSION_CONCURRENCY, ADMISSION_QUEUE, BURST = "phi4_fast", 4, 4, 32
# The real engine: a leaving client asks for this many tokens regardless of EOS, so that a stream left running
# would keep the runner busy for many seconds after the run.
LEAVER_MAX_TOKENS = 384
IDLE_WINDOW_S = 2.0
IDLE_CPU_MARGIN_S = 0.5


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
        assert len(self.probes) >= max(1, minimum) and not slow, (len(self.probes), slow)


def wait_idle(server: Server, timeout: float = 60.0) -> dict:
    """/stats once no expert has a lease or a queued request in the model host and no stream is open."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        busy = {k: v for k, v in stats["experts"].items() if v["active_requests"] or v["queued_requests"]}
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


def leaves(index: int) -> bool:
    return index % 4 == 3


async def run_streams(url: str, body: Callable[[int], dict]) -> list[StreamResult]:
    """STREAMS concurrent streaming clients; every fourth leaves after LEAVE_AFTER_EVENTS events."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(
            stream_chat(session, url, body(i), LEAVE_AFTER_EVENTS if leaves(i) else None) for i in range(STREAMS)))


def check_run(results: list[StreamResult]) -> tuple[list[StreamResult], list[StreamResult]]:
    """The clients that left and those that finished, each as they should be."""
    left = [r for r in results if r.disconnected]
    finished = [r for r in results if not r.disconnected]
    assert len(left) == STREAMS // 4 and len(finished) == STREAMS - STREAMS // 4
    assert all(len(r.events) == LEAVE_AFTER_EVENTS and r.events[-1] != b"[DONE]" for r in left)
    texts = [check_stream(r) for r in finished]
    assert all(text.strip() for text in texts)
    return left, finished


def requests_and_tokens(stats: dict) -> tuple[int, int]:
    """Generation requests and completion tokens the front counted, over every expert."""
    return (sum(e["requests"] for e in stats["experts"].values()),
            sum(e["completion_tokens"] for e in stats["experts"].values()))


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def busy_seconds(pid: int) -> float:
    """CPU time a process and its children use in IDLE_WINDOW_S."""
    tree = process_tree(pid)
    before = cpu_seconds(tree)
    time.sleep(IDLE_WINDOW_S)
    return cpu_seconds(tree) - before


def tree_pss(pid: int) -> int:
    return sum(process_pss(p) for p in process_tree(pid))


async def ask_consensus(url: str, count: int, max_tokens: int | None = None) -> list[tuple[int, dict]]:
    """`count` identical requests without a model at once: each one fans out to the same three experts."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one() -> tuple[int, dict]:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                return response.status, await response.json()
        return await asyncio.gather(*(one() for _ in range(count)))


def top_three(path: Path) -> tuple[str, ...]:
    return Router.from_config(load_config(path)).route((ChatMessage(role="user", content=QUESTION),)).ranking()[:3]


def check_consensus(answers: list[tuple[int, dict]], top: tuple[str, ...]) -> None:
    for status, body in answers:
        assert status == 200, body
        consensus = body["consensus"]
        assert consensus["method"] == "synthesis" and body["model"] == consensus["synthesizer"] == top[0]
        assert [e["id"] for e in consensus["experts"]] == list(top) and all(e["ok"] for e in consensus["experts"])
        assert body["choices"][0]["message"]["content"].strip()


# ---------------------------------------------------------------- fake upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(models=("echo", SLOW_MODEL))
    yield fake
    fake.process.kill()  # nothing of it is under test any more; a graceful stop waits for open handlers
    fake.process.wait(10)


@pytest.fixture(scope="module")
def fake_streaming_server(tmp_path_factory, upstream) -> Iterator[Server]:
    """A streaming server on the fake upstream: EXPERT takes all the streams at once; ADMISSION_EXPERT admits few."""
    tmp = tmp_path_factory.mktemp("load-fake-streaming")
    path, config = make_config(tmp, engine="fake", upstream=upstream.url)
    for expert in config["experts"]:
        if expert["id"] == EXPERT:
            expert.update(max_concurrency=STREAMS, max_queue=STREAMS)
        elif expert["id"] == ADMISSION_EXPERT:
            expert.update(max_concurrency=ADMISSION_CONCURRENCY, max_queue=ADMISSION_QUEUE)
    server = Server("streaming", write_config(path, config), tmp / "streaming.log").wait_healthy()
    try:
        yield server
    finally:
        server.stop()


def fake_stream_body(index: int) -> dict:
    """A stream of MAX_TOKENS tokens (the text is longer), slow for the clients that will leave."""
    delay = LEAVER_DELAY_S if leaves(index) else FAST_DELAY_S
    words = " ".join(f"word{index}_{j}" for j in range(MAX_TOKENS + 4))
    return {"model": EXPERT, "messages": [{"role": "user", "content": f"[[delay={delay}]] {words}"}],
            "max_tokens": MAX_TOKENS, "stream": True}


def test_64_streams_with_a_quarter_leaving_mid_stream(fake_streaming_server, upstream):
    """The upstream's open streams show whether a stream whose client left was closed upstream: a leaving client's
    stream would stay open for seconds after the run if the front kept reading it."""
    server = fake_streaming_server
    warm_up = asyncio.run(run_streams(server.url, fake_stream_body))
    assert all(r.complete or r.disconnected for r in warm_up)
    requests_before, tokens_before = requests_and_tokens(wait_idle(server))
    upstream_before = len(upstream.requests())
    before = process_pss(server.process.pid)

    started = time.monotonic()
    with HealthProbe(server.url) as health:
        results = asyncio.run(run_streams(server.url, fake_stream_body))
    ended = time.monotonic()

    left, finished = check_run(results)
    assert all(r.status == 200 for r in results)
    health.assert_answered_throughout(minimum=int((ended - started) / (PROBE_LIMIT_S + 0.25)))

    while upstream.open_streams():  # the leaving clients' streams were closed upstream, long before their end
        assert time.monotonic() - ended < MAX_TOKENS * LEAVER_DELAY_S / 2, upstream.open_streams()
        time.sleep(0.05)
    assert len(upstream.requests()) - upstream_before == STREAMS
    requests_after, tokens_after = requests_and_tokens(wait_idle(server))
    assert requests_after - requests_before == STREAMS
    assert 0 < tokens_after - tokens_before <= len(finished) * MAX_TOKENS, tokens_after - tokens_before
    after = process_pss(server.process.pid)
    assert abs(after - before) <= 0.10 * before, (before, after)
    assert {k: server.health()["experts"][EXPERT][k] for k in ("state", "error")} == {"state": "ready", "error": None}


def test_a_burst_beyond_concurrency_and_queue_gets_exactly_the_admitted_count_through(fake_streaming_server,
                                                                                     upstream):
    """32 streams at once for an expert that runs 4 and queues 4, each holding its slot 2 s: 8 are served in full,
    24 get a 429 queue_full with Retry-After at once, and /health stays fast."""
    server = fake_streaming_server
    body = {"model": ADMISSION_EXPERT, "messages": [{"role": "user", "content": "[[sleep=2]] hold the slot"}],
            "stream": True}
    upstream_before = len(upstream.requests())

    async def burst_streams() -> tuple[list[StreamResult], list[tuple[dict, str | None, float]]]:
        """Every request of the burst; the served ones read to their end, the refused ones with their error."""
        served: list[StreamResult] = []
        refused: list[tuple[dict, str | None, float]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> None:
                started = time.monotonic()
                async with session.post(server.url + "/v1/chat/completions", json=body) as response:
                    if response.status != 200:
                        refused.append((await response.json(), response.headers.get("Retry-After"),
                                        time.monotonic() - started))
                        return
                    result = StreamResult(response.status)
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            result.events.append(line[6:].rstrip(b"\r\n"))
                    served.append(result)
            await asyncio.gather(*(one() for _ in range(BURST)))
        return served, refused

    with HealthProbe(server.url) as health:
        served, refused = asyncio.run(burst_streams())

    assert len(served) == ADMISSION_CONCURRENCY + ADMISSION_QUEUE and len(refused) == BURST - len(served)
    for result in served:
        assert check_stream(result) == "echo: [[sleep=2]] hold the slot"
    for error, retry_after, seconds in refused:
        assert error["error"]["code"] == "queue_full" and retry_after is not None and int(retry_after) >= 1, error
        assert f"'{ADMISSION_EXPERT}'" in error["error"]["message"]
        assert seconds < 2.0  # refused at once, not after waiting for a slot
    health.assert_answered_throughout(minimum=1)
    assert len(upstream.requests()) - upstream_before == len(served)  # the refused never reached the upstream
    stats = wait_idle(server)
    assert stats["http_errors"].get("429") == len(refused)


@pytest.fixture(scope="module")
def fake_consensus_server(tmp_path_factory, upstream) -> Iterator[tuple[Server, tuple[str, ...]]]:
    """A consensus server on the fake upstream, every expert at 0.02 s a token; returns it and QUESTION's three."""
    tmp = tmp_path_factory.mktemp("load-fake-consensus")
    path, config = make_config(tmp, engine="fake", upstream=upstream.url)
    for index in range(len(config["experts"])):
        fake_engine(config, index, SLOW_MODEL)
    config["consensus"].update(experts_per_request=3, candidate_max_tokens=8, candidate_timeout_s=30)
    server = Server("consensus", write_config(path, config), tmp / "consensus.log").wait_healthy()
    try:
        yield server, top_three(path)
    finally:
        server.stop()


def test_16_concurrent_consensus_requests(fake_consensus_server):
    """48 candidate answers and 16 syntheses; the best expert takes 32 of them through its 8 slots and its queue."""
    server, top = fake_consensus_server
    with HealthProbe(server.url) as health:
        answers = asyncio.run(ask_consensus(server.url, CONSENSUS_REQUESTS))
    check_consensus(answers, top)
    assert all(body["choices"][0]["message"]["content"] == "echo: " + QUESTION for _, body in answers)
    assert all(body["usage"]["completion_tokens"] == 4 * len(("echo: " + QUESTION).split()) for _, body in answers)
    health.assert_answered_throughout(minimum=1)
    stats = wait_idle(server)
    assert stats["consensus"]["requests"] == CONSENSUS_REQUESTS and stats["consensus"]["failures"] == {}
    assert [stats["experts"][e]["requests"] for e in top] == [2 * CONSENSUS_REQUESTS] + [CONSENSUS_REQUESTS] * 2
    assert stats["http_errors"] == {}


# ---------------------------------------------------------------- real engine (the session's runner)


def real_stream_body(experts: list[str]) -> Callable[[int], dict]:
    """Streams spread over every expert (each admits 8 and queues 32; all share the one runner). A leaving client
    asks for LEAVER_MAX_TOKENS tokens with EOS ignored: left running, its stream would keep the runner busy."""
    def body(index: int) -> dict:
        request = chat_body(index, MAX_TOKENS, experts[index % len(experts)])
        if leaves(index):
            request.update(max_tokens=LEAVER_MAX_TOKENS, ignore_eos=True)
        return request
    return body


def test_real_engine_64_streams_with_a_quarter_leaving_mid_stream(vllm_streaming_server):
    """The warm-up is the same workload, so the allocators have reached their working size before memory is
    measured. The runner's CPU time once the run is over shows whether it still generates for clients that left."""
    server = vllm_streaming_server
    experts = list(server.health()["experts"])
    runner = server.runner_pid(EXPERT)
    assert runner is not None and all(server.runner_pid(e) == runner for e in experts)
    idle_before = busy_seconds(runner)
    body = real_stream_body(experts)

    warm_up = asyncio.run(run_streams(server.url, body))
    assert all(r.complete or r.disconnected for r in warm_up)
    requests_before, tokens_before = requests_and_tokens(wait_idle(server))
    front_before, runner_before = process_pss(server.process.pid), tree_pss(runner)

    started = time.monotonic()
    with HealthProbe(server.url) as health:
        results = asyncio.run(run_streams(server.url, body))
    elapsed = time.monotonic() - started

    left, finished = check_run(results)
    health.assert_answered_throughout(minimum=int(elapsed / (PROBE_LIMIT_S + 0.25)))

    requests_after, tokens_after = requests_and_tokens(wait_idle(server))  # nothing left in the front or the host
    assert requests_after - requests_before == STREAMS
    assert 0 < tokens_after - tokens_before <= len(finished) * MAX_TOKENS
    time.sleep(1.0)
    busy = busy_seconds(runner)  # ... nor in the runner: the streams that lost their client were aborted
    assert busy <= idle_before + IDLE_CPU_MARGIN_S, (idle_before, busy)
    front_after, runner_after = process_pss(server.process.pid), tree_pss(runner)
    assert abs(front_after - front_before) <= 0.10 * front_before, (front_before, front_after)
    assert abs(runner_after - runner_before) <= 0.10 * runner_before, (runner_before, runner_after)
    assert server.runner_pid(EXPERT) == runner
    assert {k: server.health()["experts"][EXPERT][k] for k in ("state", "error")} == {"state": "ready", "error": None}


def test_real_engine_16_concurrent_consensus_requests(vllm_consensus_server):
    """48 candidate answers and 16 syntheses on the shared runner, which steps eight at a time: none may fail or
    time out."""
    server = vllm_consensus_server
    top = top_three(server.config)
    before = server.stats()["consensus"]
    with HealthProbe(server.url) as health:
        answers = asyncio.run(ask_consensus(server.url, CONSENSUS_REQUESTS, max_tokens=8))
    check_consensus(answers, top)
    assert all(e["completion_tokens"] <= 8 for _, body in answers for e in body["consensus"]["experts"])
    health.assert_answered_throughout(minimum=1)
    after = wait_idle(server)["consensus"]
    assert after["requests"] - before["requests"] == CONSENSUS_REQUESTS
    assert after["failures"] == before["failures"]
