"""Which experts are loaded: lazy loading, the warm-up pool, idle unload, an LRU cap, admission control.

A request holds its expert through `use()`: it waits for a concurrency slot (or is refused with 429
when the queue is full), shares the one load of a cold expert with every other request that wants
it, and marks the expert as used. Health probes and /stats only read state, so they never keep an
expert loaded.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from core.config import AppConfig, ExpertConfig
from core.engines import Engine, create_engine
from core.protocol import APIError, unavailable
from core.stats import Stats

log = logging.getLogger(__name__)
EngineFactory = Callable[[ExpertConfig], Awaitable[Engine]]
_PATH = re.compile(r"(?:/[\w.@+-]+){2,}")


class ExpertState(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def public_error(error: BaseException) -> str:
    """A load error as clients may see it: its kind and first line, with file paths removed."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {_PATH.sub('<path>', first_line)}".rstrip(": ")


@dataclass
class _Expert:
    config: ExpertConfig
    semaphore: asyncio.Semaphore
    state: ExpertState = ExpertState.UNLOADED
    engine: Engine | None = None
    loading: asyncio.Task | None = None
    error: str | None = None
    active: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelManager:
    def __init__(self, config: AppConfig, stats: Stats, engine_factory: EngineFactory = create_engine):
        self._config = config
        self._stats = stats
        self._factory = engine_factory
        self._experts = {e.id: _Expert(e, asyncio.Semaphore(e.max_concurrency)) for e in config.experts}
        self._background: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the warm-up pool in the background and start the idle reaper; returns at once."""
        self._spawn(self._warm_up())
        self._reaper = asyncio.create_task(self._reap_idle())

    async def close(self) -> None:
        self._closing = True
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for expert in self._experts.values():
            if expert.loading and not expert.loading.done():
                expert.loading.cancel()
                await asyncio.gather(expert.loading, return_exceptions=True)
            await self._shutdown_engine(expert)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warm_up(self) -> None:
        for expert_id in self._config.server.warmup:
            try:
                await self._ensure_loaded(self._experts[expert_id])
            except APIError as error:
                log.warning("warm-up of %s failed: %s", expert_id, error.message)

    async def _reap_idle(self) -> None:
        timeout = self._config.server.idle_timeout_s
        while True:
            await asyncio.sleep(min(self._config.server.idle_check_interval_s, timeout))
            now = time.monotonic()
            for expert in self._experts.values():
                if (expert.state is ExpertState.READY and expert.active == 0 and expert.waiting == 0
                        and now - expert.last_used >= timeout):
                    log.info("unloading %s after %.0f s idle", expert.config.id, now - expert.last_used)
                    await self._unload(expert)

    # ------------------------------------------------------------ requests

    @asynccontextmanager
    async def use(self, expert_id: str) -> AsyncIterator[Engine]:
        """Hold one concurrency slot of a loaded expert for the duration of a request."""
        expert = self._experts[expert_id]
        if self._closing:
            raise unavailable("the server is shutting down", code="shutting_down")
        if expert.semaphore.locked() and expert.waiting >= expert.config.max_queue:
            raise APIError(429, f"expert '{expert_id}' is at capacity and its queue is full; retry shortly",
                           type="rate_limit_error", code="queue_full", retry_after=1.0)
        expert.waiting += 1
        try:
            await expert.semaphore.acquire()
        finally:
            expert.waiting -= 1
        try:
            engine = await self._ensure_loaded(expert)
            expert.active += 1
            expert.last_used = time.monotonic()
            try:
                yield engine
            finally:
                expert.active -= 1
                expert.last_used = time.monotonic()
        finally:
            expert.semaphore.release()

    def request_outcome(self, expert_id: str, error: str | None) -> None:
        """A request on a ready expert ended: its error (a timeout, an upstream failure) shows in /health until
        a later one succeeds."""
        expert = self._experts[expert_id]
        if expert.state is ExpertState.READY:
            expert.error = error

    def engine_failed(self, expert_id: str, error: BaseException) -> None:
        """A running engine died: mark the expert failed so the next request loads it again."""
        expert = self._experts[expert_id]
        if expert.state is not ExpertState.READY:
            return
        expert.state = ExpertState.FAILED
        expert.error = public_error(error)
        engine, expert.engine = expert.engine, None
        if engine is not None:
            self._spawn(engine.shutdown())

    async def _ensure_loaded(self, expert: _Expert) -> Engine:
        if expert.state is ExpertState.READY and expert.engine is not None:
            return expert.engine
        if expert.loading is None or expert.loading.done():
            expert.loading = asyncio.create_task(self._load(expert))
        try:
            await asyncio.wait_for(asyncio.shield(expert.loading), expert.config.load_timeout_s)
        except asyncio.TimeoutError:
            raise unavailable(f"expert '{expert.config.id}' is still loading; retry shortly", retry_after=5.0,
                              code="expert_loading") from None
        if expert.engine is None:  # unloaded again between the load and this request
            raise unavailable(f"expert '{expert.config.id}' was unloaded; retry", code="expert_unloaded")
        return expert.engine

    async def _load(self, expert: _Expert) -> None:
        expert_id = expert.config.id
        await self._make_room(expert)
        expert.state, expert.error = ExpertState.LOADING, None
        started = time.monotonic()
        log.info("loading expert %s", expert_id)
        try:
            engine = await self._factory(expert.config)
        except asyncio.CancelledError:
            expert.state = ExpertState.UNLOADED
            raise
        except Exception as error:  # noqa: BLE001 - any load failure is reported, then retried later
            log.exception("expert %s failed to load", expert_id)
            expert.state, expert.error = ExpertState.FAILED, public_error(error)
            self._stats.record_load(expert_id, time.monotonic() - started, ok=False)
            raise unavailable(f"expert '{expert_id}' failed to load ({expert.error}); the next request will "
                              "try again", retry_after=5.0, code="expert_load_failed") from None
        expert.engine, expert.state = engine, ExpertState.READY
        expert.last_used = time.monotonic()
        self._stats.record_load(expert_id, time.monotonic() - started, ok=True)
        log.info("expert %s ready in %.1f s", expert_id, time.monotonic() - started)

    async def _make_room(self, incoming: _Expert) -> None:
        """Keep at most max_loaded_experts loaded by unloading the least recently used idle one."""
        cap = self._config.server.max_loaded_experts
        loaded = [e for e in self._experts.values()
                  if e is not incoming and e.state in (ExpertState.READY, ExpertState.LOADING)]
        while len(loaded) >= cap:
            idle = [e for e in loaded if e.state is ExpertState.READY and e.active == 0 and e.waiting == 0]
            if not idle:
                raise unavailable(f"cannot load expert '{incoming.config.id}': {cap} experts are loaded and all "
                                  "are busy", retry_after=2.0, code="capacity")
            victim = min(idle, key=lambda e: e.last_used)
            log.info("evicting %s (least recently used) to load %s", victim.config.id, incoming.config.id)
            await self._unload(victim)
            loaded.remove(victim)

    async def _unload(self, expert: _Expert) -> None:
        if expert.state is not ExpertState.READY:
            return
        expert.state = ExpertState.UNLOADED
        await self._shutdown_engine(expert)
        self._stats.record_unload(expert.config.id)

    async def _shutdown_engine(self, expert: _Expert) -> None:
        engine, expert.engine = expert.engine, None
        if engine is not None:
            await engine.shutdown()
            log.info("unloaded expert %s", expert.config.id)
        if expert.state is ExpertState.READY:
            expert.state = ExpertState.UNLOADED

    # ------------------------------------------------------------ admin and status

    async def load(self, expert_id: str) -> None:
        await self._ensure_loaded(self._experts[expert_id])

    async def unload(self, expert_id: str) -> None:
        expert = self._experts[expert_id]
        if expert.active or expert.waiting:
            raise APIError(409, f"expert '{expert_id}' is serving requests; unload it when idle",
                           code="expert_busy")
        await self._unload(expert)

    def states(self) -> dict[str, dict]:
        now = time.monotonic()
        out = {}
        for expert_id, expert in self._experts.items():
            engine = expert.engine
            out[expert_id] = {
                "state": expert.state.value,
                "error": expert.error,
                "active_requests": expert.active,
                "queued_requests": expert.waiting,
                "engine_in_flight": engine.in_flight if engine else 0,
                "idle_s": round(now - expert.last_used, 1) if expert.state is ExpertState.READY else None,
                "engine": None if engine is None else {
                    "kind": engine.info.kind, "effective": engine.info.effective, "warnings": engine.info.warnings},
            }
        return out
