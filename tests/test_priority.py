"""Priorities: a port's tier first, the client's own priority only within it; waiting requests age; a waiter that
leaves gives its place up.

Through real fronts on the fake upstream: one expert admits one request at a time, a slow request holds the slot,
and the order in which the queued requests then reach the upstream is the admission order. The aging itself is
shown on the admission queue with a clock the test moves, since a point a second is too slow to wait for.
"""
from __future__ import annotations

import asyncio
import threading
import time

import requests

from core.host.admission import Admission
from tests.conftest import make_config, write_config

CHAT = "/v1/chat/completions"
TIER = 2001  # the width of a tier: a client's priority spans -1000..1000 within it
STREAMING, STANDARD = -10, 0  # the defaults of server.priorities


def one_at_a_time(tmp_path, fake_upstream, **expert) -> tuple:
    """The fake config with phi4_fast admitting one request at a time."""
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    config["experts"][0].update({"max_concurrency": 1, **expert})
    assert config["experts"][0]["id"] == "phi4_fast"
    return write_config(path, config), config


def expert_stats(server) -> dict:
    return server.stats()["experts"]["phi4_fast"]


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def post(server, text: str, results: dict, timeout: float = 30, **extra) -> threading.Thread:
    def send() -> None:
        try:
            results[text] = requests.post(server.url + CHAT, timeout=timeout, json={
                "model": "phi4_fast", "messages": [{"role": "user", "content": text}], **extra}).status_code
        except requests.RequestException as error:
            results[text] = type(error).__name__

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_client_priority_orders_only_within_its_ports_tier(tmp_path, start_server, fake_upstream):
    """Queued behind a slow request: the streaming front's least urgent request still goes before the standard
    front's most urgent one, and within the standard tier the client's priority decides, then arrival."""
    path, _ = one_at_a_time(tmp_path, fake_upstream)
    standard, streaming = start_server("standard", path), start_server("streaming", path)
    marker = f"{tmp_path.name}:"
    results: dict = {}
    threads = [post(standard, f"{marker} blocker [[sleep=2]]", results)]
    wait_until(lambda: expert_stats(standard)["active_requests"] == 1, "the blocker holds the slot")
    queued = [(standard, "standard +1000", 1000), (standard, "standard -1000", -1000), (standard, "standard 0", 0),
              (streaming, "streaming +1000", 1000), (standard, "standard 0 later", 0)]
    for position, (server, text, priority) in enumerate(queued, 1):
        threads.append(post(server, f"{marker} {text}", results, priority=priority))
        wait_until(lambda: expert_stats(standard)["queued_requests"] == position, f"{text} is queued")
    for thread in threads:
        thread.join(30)
    assert set(results.values()) == {200}, results
    received = {r["body"]["messages"][-1]["content"].removeprefix(f"{marker} "): r["body"]["priority"]
                for r in fake_upstream.requests()
                if "messages" in r["body"] and str(r["body"]["messages"][-1]["content"]).startswith(marker)}
    assert list(received) == ["blocker [[sleep=2]]", "streaming +1000", "standard -1000", "standard 0",
                              "standard 0 later", "standard +1000"], received
    assert received["streaming +1000"] == STREAMING * TIER + 1000 < STANDARD * TIER - 1000
    assert received["standard -1000"] == -1000 and received["standard +1000"] == 1000


def test_a_client_that_leaves_the_queue_frees_its_place(tmp_path, start_server, fake_upstream):
    """With a queue of one: a queued client that gives up is out of the queue at once, so the next one is queued
    (not refused with 429) while the slow request still runs."""
    path, _ = one_at_a_time(tmp_path, fake_upstream, max_queue=1)
    server = start_server("standard", path)
    results: dict = {}
    blocker = post(server, "blocker [[sleep=3]]", results)
    wait_until(lambda: expert_stats(server)["active_requests"] == 1, "the blocker holds the slot")
    leaver = post(server, "leaver", results, timeout=0.5)
    leaver.join(5)
    assert results["leaver"] == "ReadTimeout"
    wait_until(lambda: expert_stats(server)["queued_requests"] == 0, "the leaver's place is freed", timeout=2)
    assert expert_stats(server)["active_requests"] == 1  # the blocker is still running
    stayer = post(server, "stayer", results)
    stayer.join(30)
    blocker.join(30)
    assert results["stayer"] == 200 and results["blocker [[sleep=3]]"] == 200, results


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_waiting_request_ages_past_more_urgent_later_ones():
    """One point a second: a request queued at priority 10 goes after one queued 5 s later at 0 (aged 5 points
    less), but before one queued 20 s later at 0 (it has gained 20)."""
    clock = Clock()
    admission = Admission(1, aging_per_s=1.0, clock=clock)
    await admission.acquire(0)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await admission.acquire(priority)
        order.append(name)
        admission.release()

    waiters = []
    for name, priority, at in (("patient", 10, 0), ("urgent, soon after", 0, 5), ("urgent, much later", 0, 20)):
        clock.now = 1000.0 + at
        waiters.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0)
    admission.release()
    await asyncio.gather(*waiters)
    assert order == ["urgent, soon after", "patient", "urgent, much later"]


async def test_a_cancelled_waiter_is_removed_from_the_heap():
    admission = Admission(1)
    await admission.acquire(0)
    waiters = [asyncio.create_task(admission.acquire(priority)) for priority in (5, -5, 0)]
    await asyncio.sleep(0)
    assert admission.waiting == 3
    waiters[1].cancel()
    await asyncio.gather(waiters[1], return_exceptions=True)
    assert admission.waiting == 2  # gone from the heap before any release
    admission.release()
    await asyncio.sleep(0)
    assert waiters[2].done() and not waiters[0].done()  # the next by priority, not the cancelled one
    assert (admission.active, admission.waiting) == (1, 1)
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    assert (admission.active, admission.waiting) == (1, 0)
