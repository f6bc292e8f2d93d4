"""Admission to one expert: at most `limit` requests at once, the rest queued by priority, aged while they wait.

vLLM orders its own queue by request priority, but a request only reaches it once admitted here; so the host's
queue honours the same order (lower first, first come first served within a priority), or an 8083 stream would
wait behind every 8082 request queued before it. A waiting request's priority improves by `aging_per_s` points a
second, so a steady flow of more urgent requests delays it but never starves it; a waiter that leaves is taken
out of the queue at once, so the queue's length is what waits.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

AGING_PER_S = 1.0  # priority points a waiting request gains each second


class Admission:
    def __init__(self, limit: int, aging_per_s: float = AGING_PER_S,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.active = 0
        self.aging_per_s = aging_per_s
        self._clock = clock
        # (priority aged to the clock's zero, arrival, future): every waiter ages at the same rate, so the order
        # of `priority - aging * waited` is that of `priority + aging * enqueued`, fixed once pushed.
        self._queue: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def acquire(self, priority: int) -> None:
        if self.active < self.limit and not self._queue:
            self.active += 1
            return
        future = asyncio.get_running_loop().create_future()
        entry = (priority + self.aging_per_s * self._clock(), next(self._order), future)
        heapq.heappush(self._queue, entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # admitted just as the waiter left: pass the slot on
                self.release()
            else:
                future.cancel()
                if entry in self._queue:  # not yet dropped by a release() that ran since the cancel
                    self._queue.remove(entry)
                    heapq.heapify(self._queue)
            raise

    def release(self) -> None:
        self.active -= 1
        while self._queue:
            _, _, future = heapq.heappop(self._queue)
            if not future.done():  # a done one was cancelled and its waiter has not run to remove it yet
                self.active += 1
                future.set_result(None)
                return
