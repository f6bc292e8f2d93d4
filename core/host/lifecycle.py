"""Runner lifecycle: start, watch, restart with backoff, evict and stop the engines the host owns.

Mechanism only: which runner to load and when is asked of it by the leases (`core.host.model_host`). A runner is
marked loading before any await, so two concurrent callers share one start and the LRU cap counts it at once; a
runner being stopped still counts until its processes are gone.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from core.config import AppConfig, ExpertConfig
from core.host.protocol import HostAddress
from core.host.runner import (RunnerError, RunnerPlan, RunnerProcess, cpu_flags, cpu_path, plan_runner, runner_key,
                              split_cores, start_env)
from core.host.standby import Standby
from core.models.verdict import serving_verdict
from core.upstream import Upstream, UpstreamError

log = logging.getLogger("capibara6.host")
HEALTHY_RUN_S = 60.0  # a runner that ran this long before crashing starts its backoff afresh
STOP_GRACE_S = 10.0  # an unload's SIGTERM-to-SIGKILL wait: vLLM finishes its open requests' aborts
COMPILE_BEHIND_TIMEOUT_S = 3600.0  # a compiled twin runs only while its eager runner is idle: it may take long
CLOSE_GRACE_S = 2.0  # the same when the host itself stops: every runner at once, the host gone within 5 s
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
    base_url: str | None = None  # a remote runner's; a local one is reached on its process's socket
    plan: RunnerPlan | None = None
    cores: str | None = None
    loading: asyncio.Task | None = None
    stopping: asyncio.Task | None = None  # an unload under way: the runner occupies its place until it ends
    error: str | None = None
    active: int = 0  # leases granted and not yet ended
    waiting: int = 0  # leases queued for a concurrency slot of one of its experts
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0
    load_failures: int = 0
    failed_in_a_row: int = 0  # loads that failed since the last success: the retry backoff's exponent
    load_cancels: int = 0
    unloads: int = 0
    crashes: int = 0
    retry_at: float = 0.0
    last_load_s: float | None = None
    last_start_phases: dict[str, float | None] | None = None  # seconds per phase of its last process start
    last_start_from_standby: bool = False
    upgrading: asyncio.Task | None = None  # an eager-first runner's compiled twin, starting behind it
    last_compiled_s: float | None = None  # from the eager runner being ready until its compiled twin took over

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
        return not self.remote and (self.state in (State.LOADING, State.READY) or self.stopping is not None)

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.waiting == 0

    def describe(self, pool: set[str]) -> dict[str, Any]:
        plan = self.plan
        return {
            "key": self.key, "kind": self.config.engine.kind, "warm_pool": self.key in pool,
            "pid": self.process.pid if self.process else None, "base_url": self.base_url,
            "cores": self.cores, "active_requests": self.active,
            "log": str(self.process.log_path) if self.process else None,
            "effective": plan.effective if plan else None, "warnings": list(plan.warnings) if plan else [],
            "last_start": None if self.last_start_phases is None else {
                "total_s": round(sum(s for s in self.last_start_phases.values() if s is not None), 2),
                "phases_s": self.last_start_phases, "from_standby": self.last_start_from_standby,
                "compiled_after_s": self.last_compiled_s},
        }


class RunnerPool:
    """Every runner of one configuration: one per distinct model and engine settings."""

    def __init__(self, config: AppConfig, address: HostAddress):
        self.config = config
        self.log_dir = address.log_dir
        self.runtime = address.runners
        self.runners: dict[str, Runner] = {}
        for expert in config.experts:
            key = runner_key(expert)
            self.runners.setdefault(key, Runner(key, expert))
        self.warm: set[str] = {runner_key(config.expert(e)) for e in config.server.warmup}
        local = [r for r in self.runners.values() if not r.remote]
        self._core_slots = split_cores(os.cpu_count() or 1, config.server.front_cores,
                                       min(len(local), config.server.max_loaded_experts) or 1)
        self._cpu = cpu_flags()
        self._background: set[asyncio.Task] = set()
        self.closing = False
        self.standby: Standby | None = None
        self._standby_starting = False
        for runner in local:  # what each would serve, shown before its first start
            runner.plan = self.plan(runner)

    def plan(self, runner: Runner) -> RunnerPlan:
        """The runner's flags on this machine, with the quality gate's verdict on its checkpoint (read anew at
        every start, so a new `make models` takes effect without restarting the host)."""
        return plan_runner(runner.config, self._cpu, serving_verdict(runner.config.model, cpu_path()),
                           self.config.server.allowed_media_domains)

    def runner_of(self, expert: ExpertConfig) -> Runner:
        return self.runners[runner_key(expert)]

    # ------------------------------------------------------------ the pool's life

    def start(self) -> None:
        """Load the warm-up pool in the background and start the idle reaper."""
        for key in sorted(self.warm):
            self._spawn(self._warm(self.runners[key]))
        self._spawn(self._reap_idle())
        if not self.warm:  # else once the warm pool has loaded
            self._keep_standby()

    async def close(self) -> None:
        """Stop every runner at once, each with a short grace: the host is gone within seconds."""
        self.closing = True
        for task in list(self._background):
            task.cancel()
        loads = [r.loading for r in self.runners.values() if r.loading and not r.loading.done()]
        for task in loads:
            task.cancel()
        await asyncio.gather(*self._background, *loads, return_exceptions=True)
        await asyncio.gather(*(self._stop(r, CLOSE_GRACE_S) for r in self.runners.values()),
                             *([self.standby.stop()] if self.standby else []), return_exceptions=True)

    def kill_all(self) -> None:
        """Last resort on the way out: no runner may outlive the host."""
        for runner in self.runners.values():
            if runner.process is not None:
                runner.process.kill_now()
        if self.standby is not None:
            self.standby.kill_now()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warm(self, runner: Runner) -> None:
        try:
            await self.ensure_loaded(runner, runner.config.load_timeout_s)
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
                       if r.state is State.READY and not r.remote and r.idle and now - r.last_used >= timeout),
                      key=lambda r: r.last_used)
        for runner in idle:
            if loaded <= len(self.warm):
                return
            log.info("unloading %s after %.0f s idle", runner.key, now - runner.last_used)
            await self.unload(runner)
            loaded -= 1

    # ------------------------------------------------------------ loading

    async def ensure_loaded(self, runner: Runner, timeout: float) -> None:
        """Return once the runner is ready: start it, or share the start already under way."""
        if runner.state is State.READY:
            return
        if runner.stopping is not None:  # a start now would overlap the old processes (and their memory)
            await asyncio.shield(runner.stopping)
        if runner.loading is None or runner.loading.done():
            wait = runner.retry_at - time.monotonic()
            if runner.state is State.FAILED and wait > 0:
                raise HostError("restart_backoff", f"the runner of this expert failed ({runner.error}); it is tried "
                                                   f"again in {wait:.0f} s", max(1.0, wait))
            runner.state = State.LOADING  # before any await: it counts against the cap now
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
            if runner.remote:
                await self._check_remote(runner)
            else:
                await self._start_local(runner)
        except HostError:
            runner.state = State.UNLOADED  # no room now: not a failure of this runner
            raise
        except asyncio.CancelledError:
            runner.state = State.UNLOADED  # neither a success nor a failure: the last error stays as it was
            runner.load_cancels += 1
            log.info("loading runner %s was cancelled", runner.key)
            raise
        except Exception as error:  # noqa: BLE001 - whatever broke the load, the runner is failed and says why
            log.error("runner %s failed to load: %s", runner.key, error, exc_info=not isinstance(
                error, (RunnerError, UpstreamError, OSError)))
            runner.state, runner.error = State.FAILED, _first_line(error)
            runner.load_failures += 1
            runner.failed_in_a_row += 1
            server = self.config.server
            backoff = min(server.max_restart_backoff_s, server.restart_backoff_s * 2 ** (runner.failed_in_a_row - 1))
            runner.retry_at = time.monotonic() + backoff
            raise HostError("expert_load_failed", f"runner {runner.key} failed to load ({runner.error}); it is "
                                                  f"tried again in {backoff:.0f} s", backoff) from None
        else:
            runner.state, runner.error, runner.last_used = State.READY, None, time.monotonic()
            runner.failed_in_a_row = 0
            runner.loads += 1
            runner.last_load_s = time.monotonic() - started
            log.info("runner %s ready in %.1f s", runner.key, runner.last_load_s)
        finally:
            self._keep_standby()

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
        runner.plan = RunnerPlan(runner.model, (), {"base_url": upstream.base_url, "remote_model": runner.model,
                                      "api_key_env": options.api_key_env}, ())

    async def _start_local(self, runner: Runner) -> None:
        plan = self.plan(runner)
        for warning in plan.warnings:
            log.warning("%s: %s", runner.key, warning)
        runner.cores = runner.config.engine.cpu_cores or self._free_cores()  # taken before any await
        first = plan.eager() if plan.eager_first else plan
        standby, self.standby = self.standby, None  # one start at a time may adopt it
        process = await RunnerProcess.start(runner.key, first, runner.cores, self.runtime, self.log_dir, standby,
                                            stage="eager" if plan.eager_first else "")
        if standby is not None and not process.from_standby:
            self.standby = standby  # another start may fit it
        runner.process, runner.plan = process, first
        try:
            await process.wait_ready(runner.config.load_timeout_s)
        except BaseException:
            runner.process = None
            await asyncio.shield(process.stop(CLOSE_GRACE_S))  # even when cancelled: no process is left behind
            raise
        runner.last_start_phases = process.phases.durations()
        runner.last_start_from_standby = process.from_standby
        runner.last_compiled_s = None
        log.info("runner %s started%s: %s", runner.key, " eager" if plan.eager_first else "",
                 process.phases.summary())
        self._spawn(self._watch(runner, process))
        if plan.eager_first:
            runner.upgrading = asyncio.create_task(self._compile_behind(runner, plan, process))
            self._background.add(runner.upgrading)
            runner.upgrading.add_done_callback(self._background.discard)

    async def _compile_behind(self, runner: Runner, plan: RunnerPlan, eager: RunnerProcess) -> None:
        """Start the compiled runner beside the eager one; once it answers, new requests go to it and the eager
        one stops when its last request ends. If it cannot start, the eager runner goes on serving."""
        started = time.monotonic()
        try:
            process = await RunnerProcess.start(runner.key, plan, runner.cores or self._free_cores(), self.runtime,
                                                self.log_dir)
            pausing = asyncio.create_task(_run_while_idle(process, eager))
            try:
                await process.wait_ready(COMPILE_BEHIND_TIMEOUT_S)
            except BaseException:
                await asyncio.shield(process.stop(CLOSE_GRACE_S))
                raise
            finally:
                pausing.cancel()
                process.pause(False)
        except (RunnerError, OSError) as error:
            log.warning("runner %s stays eager: its compiled twin did not start (%s)", runner.key, error)
            return
        finally:
            if runner.upgrading is asyncio.current_task():  # not a newer start's, after a crash cancelled this one
                runner.upgrading = None
            self._keep_standby()
        if runner.process is not eager:  # the eager twin crashed meanwhile: its restart starts afresh
            await process.stop(CLOSE_GRACE_S)
            return
        runner.process, runner.plan = process, plan
        runner.last_compiled_s = round(time.monotonic() - started, 2)
        log.info("runner %s compiled behind its eager twin in %.1f s: %s", runner.key, runner.last_compiled_s,
                 process.phases.summary())
        self._spawn(self._watch(runner, process))
        self._spawn(self._retire(eager))

    async def _retire(self, process: RunnerProcess) -> None:
        """Stop a replaced process once the requests it was granted have ended."""
        try:
            while process.leases:
                await asyncio.sleep(0.2)
        finally:
            await asyncio.shield(process.stop(STOP_GRACE_S))

    # ------------------------------------------------------------ the standby

    def _keep_standby(self) -> None:
        """Start a standby if there is none and no runner is loading: its imports never slow a start."""
        if (not self.config.server.standby_runner or self.closing or self._standby_starting
                or any(r.state is State.LOADING or r.upgrading for r in self.runners.values())
                or (self.standby is not None and self.standby.process.returncode is None)):
            return
        local = sorted((r for r in self.runners.values() if not r.remote), key=lambda r: (r.key in self.warm, r.key))
        if local:  # made for the likeliest next start: a runner outside the warm pool
            self.standby, self._standby_starting = None, True
            self._spawn(self._start_standby(local[0]))

    async def _start_standby(self, like: Runner) -> None:
        log_path = self.log_dir / "standby.log"
        env = start_env(self.plan(like), self._core_slots[0], self.runtime, log_path, "")
        del env["VLLM_API_KEY"]
        try:
            self.standby = await Standby.start(env, log_path)
            log.info("standby runner started: pid %d", self.standby.pid)
        except OSError as error:
            log.warning("no standby runner: %s", error)
        finally:
            self._standby_starting = False

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
        runner.process = None
        process.kill_now()  # its engine-core children
        if runner.upgrading is not None:  # its compiled twin too: the restart starts afresh
            runner.upgrading.cancel()
        log.error("runner %s crashed: %s; restart allowed in %.0f s", runner.key, runner.error, backoff)
        if runner.key in self.warm and not self.closing:
            await asyncio.sleep(backoff)
            if runner.state is State.FAILED:
                await self._warm(runner)

    # ------------------------------------------------------------ unloading

    async def _make_room(self, incoming: Runner) -> None:
        """Keep at most max_loaded_experts local runners by unloading the least recently used idle one."""
        if incoming.remote:
            return
        cap = self.config.server.max_loaded_experts
        while sum(1 for r in self.runners.values() if r.occupies and r is not incoming) >= cap:
            idle = [r for r in self.runners.values()
                    if r is not incoming and r.occupies and r.state is State.READY and r.idle]
            if not idle:
                raise HostError("capacity", f"cannot load runner {incoming.key}: {cap} runners are loaded and all "
                                            "are busy", 2.0)
            victim = min(idle, key=lambda r: r.last_used)
            log.info("evicting %s (least recently used) to load %s", victim.key, incoming.key)
            await self.unload(victim)

    async def unload(self, runner: Runner) -> None:
        """Returns once the runner's processes are gone; until then it still counts against the cap."""
        if runner.state is not State.READY:
            return
        runner.state = State.UNLOADED
        await self._stop(runner)
        runner.unloads += 1

    async def _stop(self, runner: Runner, grace_s: float = STOP_GRACE_S) -> None:
        if runner.upgrading is not None:  # its compiled twin goes first, before the cores are given back
            upgrading = runner.upgrading
            upgrading.cancel()
            await asyncio.gather(upgrading, return_exceptions=True)
        process, runner.process, runner.base_url, runner.cores = runner.process, None, None, None
        if process is not None:
            runner.stopping = stopping = asyncio.ensure_future(process.stop(grace_s))
            stopping.add_done_callback(lambda _: _stopped(runner, stopping))
            await asyncio.shield(stopping)  # a cancelled unload still ends the processes
            log.info("stopped runner %s (pid %d)", runner.key, process.pid)
        if runner.state is State.READY:
            runner.state = State.UNLOADED


async def _run_while_idle(twin: RunnerProcess, eager: RunnerProcess) -> None:
    """Pause the compiling twin while the eager runner has requests. Two OpenMP teams on the same cores wait on
    each other's threads: under a steady stream of requests here the compile took 560 s instead of 35, and the
    requests slowed; so the requests come first and the compile uses the gaps between them."""
    paused = False
    while True:
        busy = eager.leases > 0
        if busy != paused:
            twin.pause(busy)
            paused = busy
        await asyncio.sleep(0.05)


def _stopped(runner: Runner, stop: asyncio.Future) -> None:
    if runner.stopping is stop:
        runner.stopping = None


def _first_line(error: BaseException) -> str:
    """An error as clients may read it: its first line, with file paths taken out."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return _PATH.sub("<path>", line)
