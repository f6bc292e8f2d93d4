"""The model host over real sockets: one host and one runner per distinct engine, shared by the three fronts.

The lifecycle runs on real vLLM runners, whose experts differ in their engine settings (a seed) so that each
has its own runner: the warm pool at start, one shared cold start for concurrent requests from two fronts, a
runner killed mid-stream (its stream ends with an error event, the others finish, the next request restarts it),
LRU eviction at the cap, and idle unloading that stops processes, returns memory and keeps the pool warm.
Admission and admin actions, which do not depend on the engine, run on the fake upstream.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from core.config import load_config
from core.host.admission import Admission
from core.host.lifecycle import HostError, RunnerPool, State
from core.host.model_host import ModelHost
from core.host.protocol import HostAddress
from core.harness.processes import suite_pss
from tests.conftest import (FakeUpstream, Server, alive, fake_engine, host_pids, make_config, process_tree,
                            write_config)

CHAT = "/v1/chat/completions"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
RUNNER_A, RUNNER_B, RUNNER_C = "phi4_fast", "qwen_coder", "mistral_balanced"


def chat(server: Server, model: str, content: str = "hi there", timeout: float = 300, **extra) -> requests.Response:
    return requests.post(server.url + CHAT, timeout=timeout,
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def parallel(calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def host_pid(config: Path) -> int:
    """The model host serving a config file."""
    pids = host_pids(config)
    assert pids, f"no model host for {config}"
    return pids[0]


def states(server: Server) -> dict[str, dict]:
    return server.stats()["experts"]


# ---------------------------------------------------------------- real runners


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, real_engine):
    """Three runners (A: phi4_fast and the experts that share its settings, B: qwen_coder with another seed,
    C: mistral_balanced with our kernels),
    at most two loaded, A warm; a standard and a streaming front on the same host. The idle timeout is a few times
    a runner's start and longer than any test's pause between uses of a runner, so that nothing is unloaded before
    the idle test waits for it (which waits the whole timeout). Float32 and eager: four starts without
    compilation, and our kernels are float32 kernels of vLLM's eager custom ops."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    path, config = make_config(tmp, engine="float32-eager", warmup=[RUNNER_A], max_loaded_experts=2,
                               idle_timeout_s=40, idle_check_interval_s=0.5)
    for expert in config["experts"]:
        expert["engine"]["seed"] = 1 if expert["id"] == RUNNER_B else 0
    next(e for e in config["experts"] if e["id"] == RUNNER_C)["engine"]["neon_kernels"] = True
    write_config(path, config)
    standard = Server("standard", path, tmp / "standard.log").wait_healthy()
    try:
        streaming = Server("streaming", path, tmp / "streaming.log").wait_healthy()
        try:
            yield path, standard, streaming
        finally:
            streaming.stop()
    finally:
        standard.stop()


def test_the_warm_pool_loads_at_start_and_experts_with_equal_settings_share_its_runner(lifecycle):
    path, standard, streaming = lifecycle
    standard.wait_state(RUNNER_A, "ready", timeout=300)
    models = standard.models()
    assert models[RUNNER_A]["engine"]["warm_pool"] is True
    pid = models[RUNNER_A]["engine"]["pid"]
    assert pid and alive(pid)
    sharing = [e for e, m in models.items() if m["engine"]["key"] == models[RUNNER_A]["engine"]["key"]]
    assert sorted(sharing) == ["aya_expanse_multilingual", "gemma3_multimodal", RUNNER_A]
    assert all(models[e]["engine"]["pid"] == pid and models[e]["state"] == "ready" for e in sharing)
    assert {models[e]["state"] for e in (RUNNER_B, RUNNER_C)} == {"unloaded"}
    assert streaming.models()[RUNNER_A]["engine"]["pid"] == pid  # one host for both fronts
    answer = chat(streaming, "gemma3_multimodal", "Name a colour.", max_tokens=8)
    assert answer.status_code == 200 and answer.json()["model"] == "gemma3_multimodal"


def test_models_show_the_phases_of_the_last_start_and_the_engine_core_is_forked(lifecycle):
    path, standard, streaming = lifecycle
    standard.wait_state(RUNNER_A, "ready", timeout=300)
    start = standard.models()[RUNNER_A]["engine"]["last_start"]
    phases = start["phases_s"]
    assert list(phases) == ["imports", "engine_process", "weights", "compile", "serving"]
    assert all(seconds is not None and seconds >= 0 for seconds in phases.values()), phases  # every marker seen
    assert start["total_s"] == pytest.approx(sum(phases.values()), abs=0.05)
    # forked from the API server, the engine core imports nothing again (spawned, it took as long as the imports)
    assert phases["engine_process"] < phases["imports"] / 2, phases
    assert standard.models()[RUNNER_A]["engine"]["effective"]["fork_engine_core"] is True


def test_concurrent_cold_requests_from_two_fronts_share_one_start(lifecycle):
    path, standard, streaming = lifecycle
    responses = parallel([lambda: chat(standard, RUNNER_B, max_tokens=8)] * 2
                         + [lambda: chat(streaming, RUNNER_B, max_tokens=8)] * 2)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    expert = states(standard)[RUNNER_B]
    assert expert["state"] == "ready" and expert["loads"] == 1
    assert standard.models()[RUNNER_B]["engine"]["pid"] == streaming.models()[RUNNER_B]["engine"]["pid"]


def test_a_runner_killed_mid_stream_fails_only_its_stream_and_restarts_on_the_next_request(lifecycle):
    path, standard, streaming = lifecycle
    victim = standard.models()[RUNNER_B]["engine"]["pid"]
    long = {"max_tokens": 400, "ignore_eos": True, "stream": True}

    def stream(server: Server, model: str) -> list[dict]:
        response = requests.post(server.url + CHAT, stream=True, timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], **long})
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
                if model == RUNNER_B and len(events) == 5:
                    os.kill(victim, signal.SIGKILL)
        return events

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        killed = pool.submit(stream, streaming, RUNNER_B)
        other = pool.submit(stream, standard, RUNNER_A)
        killed_events, other_events = killed.result(), other.result()
    assert "error" in killed_events[-1], killed_events[-3:]
    assert killed_events[-1]["error"]["code"] == "engine_failed"
    assert "error" not in other_events[-1] and other_events[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 10
    while standard.health()["experts"][RUNNER_B]["state"] != "failed":
        assert time.monotonic() < deadline, standard.health()
        time.sleep(0.1)
    assert "signal 9" in standard.health()["experts"][RUNNER_B]["error"]
    assert not alive(victim)
    again = chat(standard, RUNNER_B, max_tokens=8)
    assert again.status_code == 200, again.text
    restarted = standard.models()[RUNNER_B]["engine"]["pid"]
    assert restarted != victim and alive(restarted)
    assert states(standard)[RUNNER_B]["loads"] == 2 and standard.health()["experts"][RUNNER_B]["error"] is None


def test_at_the_cap_the_least_recently_used_idle_runner_is_stopped(lifecycle):
    path, standard, streaming = lifecycle
    assert chat(standard, RUNNER_B, max_tokens=4).status_code == 200  # B is now more recent than A
    evicted = process_tree(standard.models()[RUNNER_A]["engine"]["pid"])
    assert chat(standard, RUNNER_C, max_tokens=4).status_code == 200
    health = standard.health()["experts"]
    assert (health[RUNNER_A]["state"], health[RUNNER_B]["state"], health[RUNNER_C]["state"]) == \
        ("unloaded", "ready", "ready")
    assert not any(alive(pid) for pid in evicted), "the evicted runner's processes still run"


def test_our_kernels_inside_a_runner_give_the_same_greedy_text(lifecycle):
    path, standard, streaming = lifecycle
    models = standard.models()
    assert models[RUNNER_C]["engine"]["effective"]["neon_kernels"] is True
    assert models[RUNNER_B]["engine"]["effective"]["neon_kernels"] is False
    log = Path(models[RUNNER_C]["engine"]["log"]).read_text()
    assert "neon_ext: replaced RMSNorm, SiluAndMul, GeluAndMul, RotaryEmbedding" in log
    assert "neon_ext: replaced" not in Path(models[RUNNER_B]["engine"]["log"]).read_text()
    system = {"role": "system", "content": "You are a helpful assistant."}
    for question in ("What is the capital of France?", "Write a Python function that adds two numbers."):
        answers = {}
        for model in (RUNNER_B, RUNNER_C):
            response = requests.post(standard.url + CHAT, timeout=300, json={
                "model": model, "messages": [system, {"role": "user", "content": question}], "temperature": 0,
                "max_tokens": 48})
            assert response.status_code == 200, response.text
            answers[model] = response.json()["choices"][0]["message"]["content"]
        assert answers[RUNNER_B] == answers[RUNNER_C] and answers[RUNNER_B]


def test_idle_runners_are_stopped_down_to_the_pool_size_and_memory_returns(lifecycle):
    path, standard, streaming = lifecycle
    assert chat(standard, RUNNER_B, max_tokens=4).status_code == 200
    assert chat(streaming, RUNNER_C, max_tokens=4).status_code == 200  # C is the most recently used
    stopped = process_tree(standard.models()[RUNNER_B]["engine"]["pid"])
    loaded = suite_pss(path, [standard.process.pid, streaming.process.pid])
    deadline = time.monotonic() + 180
    while standard.health()["experts"][RUNNER_B]["state"] == "ready":  # probes meanwhile do not count as use
        standard.stats()
        assert time.monotonic() < deadline, "the idle runner was never stopped"
        time.sleep(0.2)
    time.sleep(3)  # past further idle checks: the pool's one runner must still be there
    health = standard.health()["experts"]
    assert health[RUNNER_C]["state"] == "ready" and health[RUNNER_B]["state"] == "unloaded"
    assert not any(alive(pid) for pid in stopped)
    after = suite_pss(path, [standard.process.pid, streaming.process.pid])
    assert loaded - after > 300 * 2 ** 20, (loaded, after)
    assert states(standard)[RUNNER_B]["unloads"] == 1


def test_runners_die_with_their_host(lifecycle):
    path, standard, streaming = lifecycle
    runners = [pid for expert in (RUNNER_B, RUNNER_C) if (root := standard.models()[expert]["engine"]["pid"])
               for pid in process_tree(root)]
    assert runners
    os.kill(host_pid(path), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in runners):
        assert time.monotonic() < deadline, [pid for pid in runners if alive(pid)]
        time.sleep(0.1)


# ---------------------------------------------------------------- admission and admin, on the fake upstream


def test_full_queue_is_refused_with_429_across_fronts(tmp_path, start_server, fake_upstream):
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    config["experts"][0].update(max_concurrency=1, max_queue=1)
    write_config(path, config)
    standard = start_server("standard", path)
    streaming = start_server("streaming", path)
    calls = [lambda: chat(standard, RUNNER_A, "[[sleep=1.5]] a"), lambda: chat(streaming, RUNNER_A, "[[sleep=1.5]] b"),
             lambda: chat(standard, RUNNER_A, "[[sleep=1.5]] c")]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = []
        for call in calls:
            futures.append(pool.submit(call))
            time.sleep(0.3)
        statuses = sorted(f.result().status_code for f in futures)
    assert statuses == [200, 200, 429]
    refused = next(f.result() for f in futures if f.result().status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["Retry-After"]


def test_a_request_waiting_on_a_slow_load_gets_a_retryable_503(tmp_path, start_server):
    upstream = FakeUpstream(models_delay=3.0)
    try:
        path, config = make_config(tmp_path, engine="fake", upstream=upstream.url)
        config["experts"][0]["load_timeout_s"] = 0.5
        server = start_server("standard", write_config(path, config))
        waiting = chat(server, RUNNER_A)
        assert waiting.status_code == 503 and waiting.json()["error"]["code"] == "expert_loading"
        assert int(waiting.headers["Retry-After"]) >= 1
        server.wait_state(RUNNER_A, "ready", timeout=10)
        assert chat(server, RUNNER_A).status_code == 200
    finally:
        upstream.stop()


def test_admin_load_and_unload(tmp_path, start_server, fake_upstream):
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    fake_engine(config, 1, "echo[[delay=0.05]]")  # its own runner, so unloading it leaves the others alone
    server = start_server("standard", write_config(path, config))
    loaded = requests.post(server.url + f"/admin/experts/{RUNNER_C}/load", timeout=30)
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    unloaded = requests.post(server.url + f"/admin/experts/{RUNNER_C}/unload", timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
    missing = requests.post(server.url + "/admin/experts/nope/load", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_unloading_a_busy_expert_is_a_409(tmp_path, start_server, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    server = start_server("standard", path)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(chat, server, RUNNER_A, "[[sleep=2]] hi")
        time.sleep(0.7)
        refused = requests.post(server.url + f"/admin/experts/{RUNNER_A}/unload", timeout=30)
        assert busy.result().status_code == 200
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "expert_busy"


def test_the_host_exits_with_its_last_front(tmp_path, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    first = Server("standard", path, tmp_path / "a.log").wait_healthy()
    second = Server("consensus", path, tmp_path / "b.log").wait_healthy()
    host = host_pid(path)
    first.stop()
    time.sleep(2)  # past host_linger_s: the consensus front still holds it
    assert alive(host) and second.health()["status"] == "ok"
    second.stop()
    deadline = time.monotonic() + 10
    while alive(host):
        assert time.monotonic() < deadline, "the host outlived its fronts"
        time.sleep(0.1)


def test_a_front_starts_a_new_host_if_its_host_dies(tmp_path, start_server, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    server = start_server("standard", path)
    old = host_pid(path)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        try:
            if chat(server, RUNNER_A).status_code == 200 and host_pid(path) != old:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)


# ---------------------------------------------------------------- the host's own rules, in-process


class InstantRunners(RunnerPool):
    """Runner processes replaced by a short sleep: for the host's rules that do not depend on the engine."""

    start_s = 0.2
    stop_s = 0.2
    fail_next_stop = False

    async def _start_local(self, runner) -> None:
        await asyncio.sleep(self.start_s)
        runner.base_url = "http://127.0.0.1:9"

    async def _stop(self, runner, grace_s: float = 0.0) -> None:
        if self.fail_next_stop:
            self.fail_next_stop = False
            raise RuntimeError("the runner would not stop")
        await asyncio.sleep(self.stop_s)
        runner.base_url = None
        if runner.state is State.READY:
            runner.state = State.UNLOADED


def distinct_runners(tmp_path: Path, **server) -> ModelHost:
    path, config = make_config(tmp_path, **server)
    for seed, expert in enumerate(config["experts"]):
        expert["engine"]["seed"] = seed
    loaded = load_config(write_config(path, config))
    address = HostAddress.for_config(path, loaded)
    return ModelHost(loaded, address, InstantRunners(loaded, address))


async def test_two_cold_starts_never_both_pass_the_cap(tmp_path):
    """Both find the one slot taken by an idle runner; while the first evicts it, the second must not get in."""
    host = distinct_runners(tmp_path, max_loaded_experts=1)
    async with host.lease(RUNNER_C):
        pass

    async def hold(expert: str):
        async with host.lease(expert):
            await asyncio.sleep(0.1)

    outcomes = await asyncio.gather(hold(RUNNER_A), hold(RUNNER_B), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, HostError)]
    assert len(refused) == 1 and refused[0].code == "capacity", outcomes
    assert sum(1 for r in host.runners.values() if r.state is State.READY) == 1
    await host.close()


async def test_a_failed_idle_unload_does_not_end_idle_unloading(tmp_path):
    host = distinct_runners(tmp_path, idle_timeout_s=0.3, idle_check_interval_s=0.1, max_loaded_experts=3)
    for expert in (RUNNER_A, RUNNER_B):
        async with host.lease(expert):
            pass
    host.pool.fail_next_stop = True
    host.start()
    deadline = time.monotonic() + 5
    while any(r.state is State.READY for r in host.runners.values()):
        assert time.monotonic() < deadline, {k: r.state for k, r in host.runners.items()}
        await asyncio.sleep(0.05)
    assert host.pool.fail_next_stop is False  # the first unload did fail, and the reaper went on
    await host.close()


async def test_waiting_requests_are_admitted_by_priority_then_arrival():
    admission = Admission(1)
    await admission.acquire(0)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await admission.acquire(priority)
        order.append(name)
        admission.release()

    waiters = []
    for name, priority in (("standard-1", 0), ("candidate", 10), ("standard-2", 0), ("gone", -20),
                           ("streaming", -10)):
        waiters.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0)
    waiters[3].cancel()  # a client that left while queued gives its turn up
    await asyncio.sleep(0)
    assert admission.waiting == 4
    admission.release()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == ["streaming", "standard-1", "standard-2", "candidate"]
    assert (admission.active, admission.waiting) == (0, 0)
