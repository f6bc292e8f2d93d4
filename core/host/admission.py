"""Admission to one expert: at most `limit` requests at once, the rest queued by priority.

vLLM orders its own queue by request priority, but a request only reaches it once admitted here; so the host's
queue honours the same order (lower first, first come first served within a priority), or an 8083 stream would
wait behind every 8082 request queued before it.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.waiting = 0
        self._queue: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    async def acquire(self, priority: int) -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._order), future))
        self.waiting += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # admitted just as the waiter left: pass the slot on
                self.release()
            else:
                self.waiting -= 1
                future.cancel()
            raise

    def release(self) -> None:
        self.active -= 1
        while self._queue:
            _, _, future = heapq.heappop(self._queue)
            if not future.done():
                self.waiting -= 1
                self.active += 1
                future.set_result(None)
                return
