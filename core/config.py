"""One validated configuration object for the whole suite, built from a JSON file.

Every server reads the same file; a bad value stops the start with a message naming the field
(``experts.2.engine.kv_cache_dtype: ...``). Relative model paths are resolved against the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_CONFIG = REPO_ROOT / "configs" / "embedded.json"
PRODUCTION_CONFIG = REPO_ROOT / "configs" / "config.json"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """Per-expert defaults, used where a request leaves a sampling field out."""

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    max_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # For a request that forces a tool call (tool_choice "required" or named): a small model's string argument can
    # loop ("sunny in Tokyo, but it's actually sunny in Tokyo, ...") until max_tokens cuts the JSON; penalising
    # repeats of its own tokens breaks the loop. Prompt tokens are not penalised: copying the city costs nothing.
    tool_call_frequency_penalty: float = Field(0.5, ge=-2.0, le=2.0)


class EngineOptions(_Strict):
    """How an expert's engine runs. ``kind`` "vllm" is a runner the model host starts (vLLM's OpenAI server with
    these settings as its flags); "remote" is an OpenAI-compatible server someone else started.

    Options this platform cannot honour (FP8 KV cache without AVX-512, graph capture on a CPU) are downgraded
    with a warning when the runner starts and reported as effective settings.
    """

    kind: Literal["vllm", "remote"] = "vllm"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["awq", "gptq", "fp8", "compressed-tensors"] | None = None
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    kv_cache_memory_bytes: int | None = Field(None, ge=16 * 1024 * 1024)
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(8, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=64)
    enforce_eager: bool = True
    max_seq_len_to_capture: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool = True
    num_scheduler_steps: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    neon_kernels: bool = False
    seed: int = 0
    # The runner's tool-call parser (vLLM's --tool-call-parser, e.g. "hermes"); without one, `tools` with
    # tool_choice "auto" are refused by the runner, while a forced tool_choice still works.
    tool_call_parser: str | None = Field(None, pattern=r"^[a-z0-9_]+$")
    # How far vLLM's structured outputs constrain tool calls (--tool-strict-level). "parameter" pins every tool's
    # argument schema, as if each tool said "strict": true, which agents (n8n, MCP clients) never send: a forced
    # tool choice then always gives arguments that parse and validate. "auto" pins only tools marked strict.
    tool_strict_level: Literal["auto", "function", "parameter"] = "parameter"
    # A call forced to one function (a named tool_choice, or "required" with one tool) is written as its arguments
    # under the function's schema, the parser's envelope added after (core/host/forced_tool_json.py): made to spell
    # the envelope token by token, SmolLM2 lost the thread (9 valid calls in 18 against 18 in 18 at temperature 0,
    # bench/bench_tool_calls.py).
    forced_tool_json: bool = True
    # A Jinja chat template for the runner instead of the model's own (vLLM's --chat-template); a path starting with
    # ./ or ../ is read against the config file. The embedded model's own drops `tools`: it never saw them.
    chat_template: str | None = None
    # Constrained JSON (tool arguments, response_format) without free whitespace between tokens (xgrammar's
    # disable_any_whitespace): a small model otherwise spends its token budget on newlines inside the JSON and is
    # cut off before the call closes (SmolLM2 did, at 120 tokens, through every front).
    compact_json: bool = True
    # Top-k/top-p drawn over each row's nucleus instead of after sorting the whole vocabulary (core/host/
    # fast_sampler.py): the same distribution, and vLLM's CPU sort cost 40 % of the throughput at 8 streams.
    fast_sampler: bool = True
    # OpenMP cores of this expert's runner (VLLM_CPU_OMP_THREADS_BIND, e.g. "0-3"); None splits the cores.
    cpu_cores: str | None = Field(None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    # vLLM's model worker in a process of its own (vLLM's default on CPU). Off, it runs in the engine-core
    # process: one interpreter fewer to start (about 25 s less here) and no worse decoding, measured on this box.
    worker_process: bool = False
    # Without a worker process: the engine core forked from vLLM's API server, inheriting its imports, instead of
    # spawned (vLLM-cpu's choice) and importing vLLM and torch again: 10-13 s less per runner start, decoding the same.
    fork_engine_core: bool = True
    # A compiled runner (enforce_eager false) starts eager first, without its 17 s of compile warm-up, and its
    # compiled twin starts behind it and takes over once it answers; eager decodes at ~0.75x until then.
    eager_first: bool = True
    # kind == "remote": an OpenAI-compatible server elsewhere.
    base_url: str | None = None
    remote_model: str | None = None
    api_key_env: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0.0)
    read_timeout_s: float = Field(120.0, gt=0.0)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "EngineOptions":
        if self.kind == "remote" and not (self.base_url and self.remote_model):
            raise ValueError("a remote engine needs base_url and remote_model")
        return self


class RoutingProfile(_Strict):
    """What the TF-IDF router knows of an expert beyond its domain and description."""

    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()


class ExpertConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    domain: str
    description: str
    model: str
    vision: bool = False
    multilingual: bool = False
    system_prompt: str = ""
    sampling: SamplingDefaults = SamplingDefaults()
    engine: EngineOptions = EngineOptions()
    routing: RoutingProfile = RoutingProfile()
    max_concurrency: int = Field(8, ge=1)
    max_queue: int = Field(32, ge=0)
    load_timeout_s: float = Field(600.0, gt=0.0)
    request_timeout_s: float = Field(300.0, gt=0.0)

    @property
    def calls_tools(self) -> bool:
        """Whether a request with tools may go to this expert: its runner parses tool calls (a remote upstream is
        taken to speak OpenAI's tools as it is)."""
        return self.engine.kind == "remote" or self.engine.tool_call_parser is not None


class RouterConfig(_Strict):
    default_expert: str | None = None
    threshold: float = Field(0.05, ge=0.0, le=1.0)


class ConsensusConfig(_Strict):
    experts_per_request: int = Field(3, ge=1)
    min_successful: int = Field(1, ge=1)
    candidate_timeout_s: float = Field(60.0, gt=0.0)
    candidate_max_tokens: int = Field(256, ge=1)
    aggregator: str | None = None


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    ports: dict[Literal["standard", "streaming", "consensus"], int] = {
        "standard": 8082,
        "streaming": 8083,
        "consensus": 8084,
    }
    warmup: tuple[str, ...] = ()
    idle_timeout_s: float = Field(300.0, gt=0.0)
    idle_check_interval_s: float = Field(15.0, gt=0.0)
    max_loaded_experts: int = Field(3, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # The most tokens one request may ask an expert to write (max_tokens, max_completion_tokens, min_tokens; on
    # 8084 the synthesis too): more is a 400 naming the field, so no client holds a runner for a whole context.
    max_tokens: int = Field(4096, ge=1)
    api_key_env: str = "CAPIBARA_API_KEY"
    # Serve without an API key on an address other than loopback (also --insecure or CAPIBARA_INSECURE=1): anyone
    # who reaches the port may then use it. Without it such a start is refused.
    insecure: bool = False
    # Hosts (exact names, as vLLM's --allowed-media-domains) whose http(s) image URLs a request may carry; empty:
    # data: images only. Addresses that are not public are refused whatever the list says (core/media.py).
    allowed_media_domains: frozenset[Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")]] = frozenset()
    log_file: str | None = None
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    # The model host: its socket and runner logs live in run_dir; it stops (and its runners with it) once no
    # server has been attached for host_linger_s.
    run_dir: str = "/tmp/capibara6"
    host_linger_s: float = Field(10.0, ge=0.0)
    restart_backoff_s: float = Field(1.0, gt=0.0)
    max_restart_backoff_s: float = Field(60.0, gt=0.0)
    # One process kept with vLLM and torch imported (about 0.5 GB), which the next runner start becomes: ~10 s less.
    standby_runner: bool = True
    # Cores kept free of runners for the fronts and the host, on machines with at least 8 cores.
    front_cores: int = Field(1, ge=0)
    # vLLM request priorities (lower runs first; runners use --scheduling-policy priority): requests through
    # 8083, through 8082 (and 8084's own answers), and consensus candidates.
    priorities: dict[Literal["streaming", "standard", "candidate"], int] = {
        "streaming": -10,
        "standard": 0,
        "candidate": 10,
    }


class AppConfig(_Strict):
    """The whole suite: server options, the experts, routing and consensus settings."""

    server: ServerConfig = ServerConfig()
    experts: tuple[ExpertConfig, ...] = Field(min_length=1)
    router: RouterConfig = RouterConfig()
    consensus: ConsensusConfig = ConsensusConfig()

    @model_validator(mode="after")
    def _cross_references(self) -> "AppConfig":
        ids = [e.id for e in self.experts]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"experts: duplicate id {duplicates[0]!r}")
        known = set(ids)
        for i, name in enumerate(self.server.warmup):
            if name not in known:
                raise ValueError(f"server.warmup.{i}: unknown expert {name!r}")
        for i, expert in enumerate(self.experts):
            if expert.sampling.max_tokens > self.server.max_tokens:
                raise ValueError(f"experts.{i}.sampling.max_tokens: {expert.sampling.max_tokens} is over "
                                 f"server.max_tokens ({self.server.max_tokens})")
        if self.consensus.candidate_max_tokens > self.server.max_tokens:
            raise ValueError(f"consensus.candidate_max_tokens: {self.consensus.candidate_max_tokens} is over "
                             f"server.max_tokens ({self.server.max_tokens})")
        for field, name in (("router.default_expert", self.router.default_expert),
                            ("consensus.aggregator", self.consensus.aggregator)):
            if name is not None and name not in known:
                raise ValueError(f"{field}: unknown expert {name!r}")
        return self

    def expert(self, expert_id: str) -> ExpertConfig | None:
        return next((e for e in self.experts if e.id == expert_id), None)

    @property
    def default_expert(self) -> str:
        return self.router.default_expert or self.experts[0].id


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return "; ".join(lines)


def parse_config(data: dict, base_dir: Path) -> AppConfig:
    """Validate a decoded config; local model and chat template paths starting with ./ or ../ are made absolute."""
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    experts = []
    for expert in config.experts:
        engine = expert.engine
        if engine.chat_template is not None:
            engine = engine.model_copy(update={"chat_template": against(base_dir, engine.chat_template)})
        experts.append(expert.model_copy(update={"model": against(base_dir, expert.model), "engine": engine}))
    return config.model_copy(update={"experts": tuple(experts)})


def against(base_dir: Path, path: str) -> str:
    """`path` made absolute against `base_dir` when it starts with ./ or ../ (written relative to the config file)."""
    return str((base_dir / path).resolve()) if path.startswith(("./", "../")) else path


def relocatable(data: dict, base_dir: Path) -> dict:
    """A decoded config with its ./ and ../ paths (models, chat templates) made absolute against `base_dir`, so
    that it may be written to another folder; the dict is changed in place and returned."""
    for expert in data.get("experts", []):
        engine = expert.get("engine") or {}
        for holder, key in ((expert, "model"), (engine, "chat_template")):
            if isinstance(holder.get(key), str):
                holder[key] = against(base_dir, holder[key])
    return data


def load_config(path: str | Path) -> AppConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    try:
        return parse_config(data, path.parent)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
