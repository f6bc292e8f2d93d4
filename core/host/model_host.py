"""The model host: one process that owns every runner for all three servers.

The fronts (8082, 8083, 8084) attach to it over a unix socket and lease an expert for each request: the lease
waits for one of the expert's concurrency slots (429 when its queue is full), shares the one start of a cold
runner, and lasts as long as the front keeps the lease's connection open, so a front that dies frees its slots.
The host keeps the warm-up pool loaded, unloads idle runners (never below the pool), caps the number of local
runners (LRU), watches for crashes and restarts with backoff. It is started by whichever front needs it first,
and exits, stopping its runners, once no front has been attached for `server.host_linger_s`.

Why a process of its own: any one server can be started, stopped or restarted by its own script without taking
the engines of the other two with it, and the runners' owner never handles client traffic.
"""
from __future__ import annotations

import argparse
import asyncio
import enum
import fcntl
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from core.host.admission import Admission
from core.config import AppConfig, ConfigError, ExpertConfig, load_config
from core.host.address import HostAddress
from core.host.runner import RunnerError, RunnerPlan, RunnerProcess, cpu_flags, plan_runner, runner_key, split_cores
from core.upstream import Upstream, UpstreamError

log = logging.getLogger("capibara6.host")
HEALTHY_RUN_S = 60.0  # a runner that ran this long before crashing starts its backoff afresh
_PATH = re.compile(r"(?:/[\w.@+-]+){2,}")


class State(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class HostError(Exception):
    """A lease or admin action the host refuses; `code` says why (the host's HTTP layer picks the status)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass
class Runner:
    """One engine, shared by the experts whose model and engine settings are the same."""

    key: str
    config: ExpertConfig  # the first expert that uses it: model and engine settings
    state: State = State.UNLOADED
    process: RunnerProcess | None = None
    base_url: str | None = None
    plan: RunnerPlan | None = None
    cores: str | None = None
    loading: asyncio.Task | None = None
    error: str | None = None
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    crashes: int = 0
    retry_at: float = 0.0
    last_load_s: float | None = None

    @property
    def remote(self) -> bool:
        return self.config.engine.kind == "remote"

    @property
    def model(self) -> str:
        """The name the runner serves the model under."""
        return self.config.engine.remote_model if self.remote else self.key

    @property
    def occupies(self) -> bool:
        """Counts against max_loaded_experts: a local runner that is up or coming up."""
        return not self.remote and self.state in (State.LOADING, State.READY)


@dataclass
class Expert:
    config: ExpertConfig
    runner: Runner
    admission: Admission
    active: int = 0

    @property
    def waiting(self) -> int:
        return self.admission.waiting


@dataclass(frozen=True)
class Grant:
    """What a lease gives the front: where to send the request and under which model name."""

    runner: str
    base_url: str
    model: str
    pid: int | None

    def render(self) -> dict[str, Any]:
        return {"runner": self.runner, "base_url": self.base_url, "model": self.model, "pid": self.pid}

    @classmethod
    def parse(cls, line: bytes) -> "Grant":
        fields = orjson.loads(line)
        return cls(fields["runner"], fields["base_url"], fields["model"], fields["pid"])


class ModelHost:
    def __init__(self, config: AppConfig, log_dir: Path):
        self.config = config
        self.log_dir = log_dir
        self.runners: dict[str, Runner] = {}
        self.experts: dict[str, Expert] = {}
        for expert in config.experts:
            key = runner_key(expert)
            runner = self.runners.setdefault(key, Runner(key, expert))
            self.experts[expert.id] = Expert(expert, runner, Admission(expert.max_concurrency))
        self.pool = {self.experts[e].runner.key for e in config.server.warmup}
        local = [r for r in self.runners.values() if not r.remote]
        self._core_slots = split_cores(os.cpu_count() or 1, config.server.front_cores,
                                       min(len(local), config.server.max_loaded_experts) or 1)
        self._cpu = cpu_flags()
        self._background: set[asyncio.Task] = set()
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the warm-up pool in the background and start the idle reaper."""
        for key in sorted(self.pool):
            self._spawn(self._warm(self.runners[key]))
        self._spawn(self._reap_idle())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for runner in self.runners.values():
            if runner.loading and not runner.loading.done():
                runner.loading.cancel()
                await asyncio.gather(runner.loading, return_exceptions=True)
        await asyncio.gather(*(self._stop(r) for r in self.runners.values()))

    def kill_all(self) -> None:
        """Last resort on the way out: no runner may outlive the host."""
        for runner in self.runners.values():
            if runner.process is not None:
                runner.process.kill_now()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warm(self, runner: Runner) -> None:
        try:
            await self._ensure_loaded(runner, runner.config.load_timeout_s)
        except HostError as error:
            log.warning("warm-up of %s failed: %s", runner.key, error.message)

    async def _reap_idle(self) -> None:
        """Unload runners idle for idle_timeout_s, least recently used first, never below the warm pool's size."""
        server = self.config.server
        while True:
            await asyncio.sleep(min(server.idle_check_interval_s, server.idle_timeout_s))
            try:
                await self._reap_once(time.monotonic())
            except Exception:  # noqa: BLE001 - one failed unload must not end idle unloading for good
                log.exception("idle unload failed; trying again at the next check")

    async def _reap_once(self, now: float) -> None:
        timeout = self.config.server.idle_timeout_s
        loaded = sum(1 for r in self.runners.values() if r.occupies)
        idle = sorted((r for r in self.runners.values()
                       if r.state is State.READY and not r.remote and self._idle(r)
                       and now - r.last_used >= timeout), key=lambda r: r.last_used)
        for runner in idle:
            if loaded <= len(self.pool):
                return
            log.info("unloading %s after %.0f s idle", runner.key, now - runner.last_used)
            await self._unload(runner)
            loaded -= 1

    def _idle(self, runner: Runner) -> bool:
        return runner.active == 0 and not any(e.waiting for e in self.experts.values() if e.runner is runner)

    # ------------------------------------------------------------ leases

    @asynccontextmanager
    async def lease(self, expert_id: str, priority: int = 0) -> AsyncIterator[Grant]:
        """Hold one concurrency slot of an expert, with its runner up, for the duration of a request. Waiting
        requests are admitted lowest priority value first, as vLLM schedules them."""
        expert = self.experts[expert_id]
        if self._closing:
            raise HostError("shutting_down", "the model host is shutting down", 1.0)
        if expert.admission.full and expert.waiting >= expert.config.max_queue:
            raise HostError("queue_full", f"expert '{expert_id}' is at capacity and its queue is full; retry "
                                          "shortly", 1.0)
        await expert.admission.acquire(priority)
        runner = expert.runner
        try:
            await self._ensure_loaded(runner, expert.config.load_timeout_s)
            runner.active += 1
            expert.active += 1
            runner.last_used = time.monotonic()
            try:
                yield Grant(runner.key, runner.base_url or "", runner.model or "",
                            runner.process.pid if runner.process else None)
            finally:
                runner.active -= 1
                expert.active -= 1
                runner.last_used = time.monotonic()
        finally:
            expert.admission.release()

    def report(self, expert_id: str, error: str | None) -> None:
        """A front's request on a ready expert ended: an upstream failure shows in /health until a success."""
        runner = self.experts[expert_id].runner
        if runner.state is State.READY:
            runner.error = error

    async def _ensure_loaded(self, runner: Runner, timeout: float) -> None:
        if runner.state is State.READY:
            return
        if runner.loading is None or runner.loading.done():
            wait = runner.retry_at - time.monotonic()
            if runner.state is State.FAILED and wait > 0:
                raise HostError("restart_backoff", f"the runner of this expert crashed ({runner.error}); it restarts "
                                                   f"in {wait:.0f} s", max(1.0, wait))
            runner.state, runner.error = State.LOADING, None  # before any await: it counts against the cap now
            runner.loading = asyncio.create_task(self._load(runner))
        try:
            await asyncio.wait_for(asyncio.shield(runner.loading), timeout)
        except TimeoutError:
            raise HostError("expert_loading", f"runner {runner.key} is still loading; retry shortly", 5.0) from None
        if runner.state is not State.READY:  # unloaded again between the load and this request
            raise HostError("expert_unloaded", f"runner {runner.key} was unloaded; retry", 1.0)

    async def _load(self, runner: Runner) -> None:
        started = time.monotonic()
        log.info("loading runner %s (%s)", runner.key, runner.config.model)
        try:
            await self._make_room(runner)
        except BaseException:
            runner.state = State.UNLOADED  # no room now: not a failure of this runner
            raise
        try:
            if runner.remote:
                await self._check_remote(runner)
            else:
                await self._start_local(runner)
        except asyncio.CancelledError:
            runner.state = State.UNLOADED
            raise
        except (RunnerError, UpstreamError, OSError) as error:
            log.error("runner %s failed to load: %s", runner.key, error)
            runner.state, runner.error = State.FAILED, _first_line(error)
            runner.load_failures += 1
            raise HostError("expert_load_failed", f"runner {runner.key} failed to load ({runner.error}); the next "
                                                  "request will try again", 5.0) from None
        runner.state, runner.last_used = State.READY, time.monotonic()
        runner.loads += 1
        runner.last_load_s = time.monotonic() - started
        log.info("runner %s ready in %.1f s", runner.key, runner.last_load_s)

    async def _check_remote(self, runner: Runner) -> None:
        """Loading a remote expert is checking that the upstream answers and lists the model."""
        options = runner.config.engine
        upstream = Upstream(options.base_url or "", where=f"the upstream of runner {runner.key}",
                            api_key_env=options.api_key_env, connect_timeout_s=options.connect_timeout_s,
                            read_timeout_s=options.read_timeout_s)
        try:
            served = await upstream.models()
        finally:
            await upstream.close()
        if runner.model not in served:
            raise RunnerError(f"{upstream.base_url} does not serve the model '{runner.model}' "
                              f"(it lists: {', '.join(served) or 'nothing'})")
        runner.base_url = upstream.base_url
        runner.plan = RunnerPlan((), {"base_url": upstream.base_url, "remote_model": runner.model,
                                      "api_key_env": options.api_key_env}, ())

    async def _start_local(self, runner: Runner) -> None:
        plan = plan_runner(runner.config, self._cpu)
        for warning in plan.warnings:
            log.warning("%s: %s", runner.key, warning)
        runner.cores = runner.config.engine.cpu_cores or self._free_cores()  # taken before any await
        process = await RunnerProcess.start(runner.config, runner.key, plan, runner.cores, self.log_dir)
        runner.process, runner.plan = process, plan
        try:
            await process.wait_ready(runner.config.load_timeout_s)
        except BaseException:
            runner.process = None
            await process.stop(grace_s=5.0)
            raise
        runner.base_url = process.base_url
        self._spawn(self._watch(runner, process))

    def _free_cores(self) -> str:
        """The first core set no other local runner holds (all runners share when there are more than sets)."""
        taken = [r.cores for r in self.runners.values() if r.occupies and r.cores is not None]
        for cores in self._core_slots:
            if cores in taken:
                taken.remove(cores)
            else:
                return cores
        return self._core_slots[0]

    async def _watch(self, runner: Runner, process: RunnerProcess) -> None:
        """Crash detection: a runner that exits while it is meant to run is failed, and restarted with backoff."""
        status = await process.process.wait()
        if runner.process is not process:  # stopped on purpose
            return
        ran = time.monotonic() - process.started
        runner.crashes = 1 if ran >= HEALTHY_RUN_S else runner.crashes + 1
        server = self.config.server
        backoff = 0.0 if runner.crashes == 1 else min(server.max_restart_backoff_s,
                                                       server.restart_backoff_s * 2 ** (runner.crashes - 2))
        how = f"signal {-status}" if status < 0 else f"status {status}"
        runner.state, runner.error = State.FAILED, f"the runner (pid {process.pid}) exited with {how}"
        runner.retry_at = time.monotonic() + backoff
        runner.process, runner.base_url = None, None
        process.kill_now()  # its engine-core children
        log.error("runner %s crashed: %s; restart allowed in %.0f s", runner.key, runner.error, backoff)
        if runner.key in self.pool and not self._closing:
            await asyncio.sleep(backoff)
            if runner.state is State.FAILED:
                await self._warm(runner)

    async def _make_room(self, incoming: Runner) -> None:
        """Keep at most max_loaded_experts local runners by unloading the least recently used idle one."""
        if incoming.remote:
            return
        cap = self.config.server.max_loaded_experts
        while sum(1 for r in self.runners.values() if r.occupies and r is not incoming) >= cap:
            idle = [r for r in self.runners.values()
                    if r is not incoming and r.occupies and r.state is State.READY and self._idle(r)]
            if not idle:
                raise HostError("capacity", f"cannot load runner {incoming.key}: {cap} runners are loaded and all "
                                            "are busy", 2.0)
            victim = min(idle, key=lambda r: r.last_used)
            log.info("evicting %s (least recently used) to load %s", victim.key, incoming.key)
            await self._unload(victim)

    async def _unload(self, runner: Runner) -> None:
        if runner.state is not State.READY:
            return
        runner.state = State.UNLOADED
        await self._stop(runner)
        runner.unloads += 1

    async def _stop(self, runner: Runner) -> None:
        process, runner.process, runner.base_url, runner.cores = runner.process, None, None, None
        if process is not None:
            await process.stop()
            log.info("stopped runner %s (pid %d)", runner.key, process.pid)
        if runner.state is State.READY:
            runner.state = State.UNLOADED

    # ------------------------------------------------------------ admin and status

    async def load(self, expert_id: str) -> None:
        expert = self.experts[expert_id]
        await self._ensure_loaded(expert.runner, expert.config.load_timeout_s)

    async def unload(self, expert_id: str) -> None:
        runner = self.experts[expert_id].runner
        if not self._idle(runner):
            raise HostError("expert_busy", f"expert '{expert_id}' is serving requests; unload it when idle")
        await self._unload(runner)

    def states(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        out = {}
        for expert_id, expert in self.experts.items():
            runner = expert.runner
            plan = runner.plan
            out[expert_id] = {
                "state": runner.state.value,
                "error": runner.error,
                "active_requests": expert.active,
                "queued_requests": expert.waiting,
                "idle_s": round(now - runner.last_used, 1) if runner.state is State.READY else None,
                "loads": runner.loads,
                "load_failures": runner.load_failures,
                "unloads": runner.unloads,
                "last_load_s": None if runner.last_load_s is None else round(runner.last_load_s, 3),
                "runner": {
                    "key": runner.key, "kind": runner.config.engine.kind, "warm_pool": runner.key in self.pool,
                    "pid": runner.process.pid if runner.process else None, "base_url": runner.base_url,
                    "cores": runner.cores, "active_requests": runner.active,
                    "log": str(runner.process.log_path) if runner.process else None,
                    "effective": plan.effective if plan else None, "warnings": list(plan.warnings) if plan else [],
                },
            }
        return out


# ---------------------------------------------------------------- the host's HTTP API (unix socket)

_STATUS = {"queue_full": 429, "expert_busy": 409, "unknown_expert": 404}


class HostApi:
    """Leases, states and admin actions for the fronts; tracks attached fronts to know when to exit."""

    def __init__(self, host: ModelHost, linger_s: float):
        self.host = host
        self.linger_s = linger_s
        self.attached = 0
        self.last_detach = time.monotonic()
        self.stopped = asyncio.Event()

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HostError as error:
            headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after else None
            body = {"error": {"message": error.message, "type": _error_type(error.code), "param": None,
                              "code": error.code}}
            return web.Response(body=orjson.dumps(body), status=_STATUS.get(error.code, 503), headers=headers,
                                content_type="application/json")

    def _expert(self, request: web.Request) -> str:
        expert_id = request.match_info["expert"]
        if expert_id not in self.host.experts:
            raise HostError("unknown_expert", f"no expert '{expert_id}'")
        return expert_id

    async def lease(self, request: web.Request) -> web.StreamResponse:
        """The grant as the first line, then the connection stays open: the lease ends when the front closes it."""
        try:
            priority = int(request.query.get("priority", 0))
        except ValueError:
            priority = 0
        async with self.host.lease(self._expert(request), priority) as grant:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(orjson.dumps(grant.render()) + b"\n")
            await asyncio.Event().wait()  # cancelled when the front closes the connection
        return response

    async def attach(self, request: web.Request) -> web.StreamResponse:
        """A front's lifeline: the host lingers while at least one is open."""
        self.attached += 1
        try:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(orjson.dumps({"pid": os.getpid()}) + b"\n")
            await asyncio.Event().wait()
        finally:
            self.attached -= 1
            self.last_detach = time.monotonic()
        return response

    async def states(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"pid": os.getpid(), "experts": self.host.states()}),
                            content_type="application/json")

    async def admin(self, request: web.Request) -> web.Response:
        expert_id = self._expert(request)
        if request.match_info["action"] == "load":
            await self.host.load(expert_id)
        else:
            await self.host.unload(expert_id)
        return web.Response(body=orjson.dumps(self.host.states()[expert_id]), content_type="application/json")

    async def report(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.host.report(self._expert(request), body.get("error"))
        return web.Response(status=204)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.errors])
        app.router.add_post("/lease/{expert}", self.lease)
        app.router.add_get("/attach", self.attach)
        app.router.add_get("/states", self.states)
        app.router.add_post(r"/experts/{expert}/{action:load|unload}", self.admin)
        app.router.add_post("/report/{expert}", self.report)
        return app

    async def linger(self) -> None:
        """Stop once no front has been attached for linger_s."""
        while True:
            await asyncio.sleep(0.5)
            if self.attached == 0 and time.monotonic() - self.last_detach >= self.linger_s:
                log.info("no server attached for %.0f s; stopping", self.linger_s)
                self.stopped.set()
                return


def _error_type(code: str) -> str:
    return {"queue_full": "rate_limit_error", "expert_busy": "invalid_request_error",
            "unknown_expert": "not_found_error"}.get(code, "service_unavailable_error")


def _first_line(error: BaseException) -> str:
    """An error as clients may read it: its first line, with file paths taken out."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return _PATH.sub("<path>", line)


async def serve(config: AppConfig, address: HostAddress) -> None:
    host = ModelHost(config, address.log_dir)
    api = HostApi(host, config.server.host_linger_s)
    runner = web.AppRunner(api.application(), handler_cancellation=True, access_log=None)
    await runner.setup()
    address.socket.unlink(missing_ok=True)
    site = web.UnixSite(runner, str(address.socket))
    await site.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, api.stopped.set)
    host.start()
    lingering = asyncio.create_task(api.linger())
    log.info("model host %d serving %s", os.getpid(), address.socket)
    try:
        await api.stopped.wait()
    finally:
        lingering.cancel()
        address.socket.unlink(missing_ok=True)
        await runner.cleanup()
        await host.close()
        host.kill_all()
        log.info("model host stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="capibara6-host", description="Capibara6 model host (started by the servers)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"capibara6-host: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    address = HostAddress.for_config(args.config, config)
    logging.basicConfig(level=os.environ.get("CAPIBARA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address.socket.parent.mkdir(parents=True, exist_ok=True)
    with open(address.lock, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another model host already serves %s", address.socket)
            return
        asyncio.run(serve(config, address))


if __name__ == "__main__":
    main()
