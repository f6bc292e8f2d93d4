"""The model host's leases: which expert a front may use now, and the runner behind it.

The fronts (8082, 8083, 8084) lease an expert for each request: the lease waits for one of the expert's
concurrency slots (429 when its queue is full), shares the one start of a cold runner, and lasts as long as the
front keeps the lease's connection open, so a front that dies frees its slots. Runners themselves (warm pool,
idle unload, LRU cap, crash restarts) are `core.host.lifecycle`; the socket API is `core.host.server`.

Why a process of its own: any one server can be started, stopped or restarted by its own script without taking
the engines of the other two with it, and the runners' owner never handles client traffic.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from core.config import AppConfig, ExpertConfig
from core.host.admission import Admission
from core.host.protocol import Grant, HostAddress
from core.host.lifecycle import HostError, Runner, RunnerPool, State


@dataclass
class Expert:
    config: ExpertConfig
    runner: Runner
    admission: Admission
    active: int = 0

    @property
    def waiting(self) -> int:
        return self.admission.waiting


class ModelHost:
    def __init__(self, config: AppConfig, address: HostAddress, pool: RunnerPool | None = None):
        self.config = config
        self.pool = pool or RunnerPool(config, address)
        self.runners = self.pool.runners
        self.experts = {e.id: Expert(e, self.pool.runner_of(e), Admission(e.max_concurrency)) for e in config.experts}

    def start(self) -> None:
        self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    def kill_all(self) -> None:
        self.pool.kill_all()

    # ------------------------------------------------------------ leases

    @asynccontextmanager
    async def lease(self, expert_id: str, priority: int = 0) -> AsyncIterator[Grant]:
        """Hold one concurrency slot of an expert, with its runner up, for the duration of a request. Waiting
        requests are admitted lowest priority value first, as vLLM schedules them."""
        expert = self.experts[expert_id]
        runner = expert.runner
        if self.pool.closing:
            raise HostError("shutting_down", "the model host is shutting down", 1.0)
        if expert.admission.full and expert.waiting >= expert.config.max_queue:
            raise HostError("queue_full", f"expert '{expert_id}' is at capacity and its queue is full; retry "
                                          "shortly", 1.0)
        runner.waiting += 1  # until it runs: queued for a slot, then for the load (the reaper must not unload)
        try:
            await expert.admission.acquire(priority)
        except BaseException:
            runner.waiting -= 1
            raise
        try:
            try:
                await self.pool.ensure_loaded(runner, expert.config.load_timeout_s)
            finally:
                runner.waiting -= 1
            runner.active += 1
            expert.active += 1
            runner.last_used = time.monotonic()
            process = runner.process  # the one granted: a runner compiled behind its eager twin may swap it
            if process is not None:
                process.leases += 1
            try:
                yield self._grant(runner)
            finally:
                runner.active -= 1
                expert.active -= 1
                runner.last_used = time.monotonic()
                if process is not None:
                    process.leases -= 1
        finally:
            expert.admission.release()

    @staticmethod
    def _grant(runner: Runner) -> Grant:
        process = runner.process
        if process is None:  # remote: its configured URL; the front adds the key it is configured with
            return Grant(runner.key, runner.base_url or "", runner.model or "", None)
        return Grant(runner.key, "", runner.model or "", process.pid, str(process.socket), process.api_key)

    def report(self, expert_id: str, error: str | None) -> None:
        """A front's request on a ready expert ended: an upstream failure shows in /health until a success."""
        runner = self.experts[expert_id].runner
        if runner.state is State.READY:
            runner.error = error

    # ------------------------------------------------------------ admin and status

    async def load(self, expert_id: str) -> None:
        expert = self.experts[expert_id]
        await self.pool.ensure_loaded(expert.runner, expert.config.load_timeout_s)

    async def unload(self, expert_id: str) -> None:
        runner = self.experts[expert_id].runner
        if not runner.idle:
            raise HostError("expert_busy", f"expert '{expert_id}' is serving requests; unload it when idle")
        await self.pool.unload(runner)

    def standby(self) -> dict[str, Any] | None:
        """The standby runner process, if one is kept: its pid and whether its imports are done."""
        return self.pool.standby.describe() if self.pool.standby else None

    def states(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {expert_id: {
            "state": expert.runner.state.value,
            "error": expert.runner.error,
            "active_requests": expert.active,
            "queued_requests": expert.waiting,
            "idle_s": round(now - expert.runner.last_used, 1) if expert.runner.state is State.READY else None,
            "loads": expert.runner.loads,
            "load_failures": expert.runner.load_failures,
            "load_cancels": expert.runner.load_cancels,
            "unloads": expert.runner.unloads,
            "last_load_s": None if expert.runner.last_load_s is None else round(expert.runner.last_load_s, 3),
            "runner": expert.runner.describe(self.pool.warm),
        } for expert_id, expert in self.experts.items()}
