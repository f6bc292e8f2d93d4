"""Experts served elsewhere: any OpenAI-compatible server (`vllm serve`, or another Capibara6) over HTTP.

The front keeps routing, admission, streaming and consensus; this engine only relays. Every request is
streamed upstream, so that a client who leaves closes the upstream connection (vLLM and Capibara6 abort on
disconnect), and the upstream's own usage is reported. Upstream failures become OpenAI-shaped 4xx/502/503/504
errors that name the expert and the upstream, never the API key.
"""
from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from core.config import ExpertConfig
from core.engines import (Engine, EngineError, EngineInfo, GenerationDelta, GenerationRequest,
                          images_in_last_user_turn)
from core.protocol import APIError, unavailable

log = logging.getLogger(__name__)
# `vllm serve` closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): drop ours sooner, so
# that a request never goes out on a connection the server is closing.
_KEEPALIVE_S = 4.0
# Statuses that say the front is misconfigured (key, URL, model), not that the client's request is wrong.
_OPERATOR_STATUSES = (401, 403, 404)


class RemoteEngine(Engine):
    def __init__(self, expert: ExpertConfig, session: aiohttp.ClientSession):
        options = expert.engine
        self.expert = expert
        self.base_url = (options.base_url or "").rstrip("/").removesuffix("/v1")  # accept OpenAI-client style URLs
        self.model = options.remote_model or ""
        self.info = EngineInfo(kind="remote", effective={
            "base_url": self.base_url, "remote_model": self.model, "api_key_env": options.api_key_env,
            "connect_timeout_s": options.connect_timeout_s, "read_timeout_s": options.read_timeout_s})
        self._session = session
        self._in_flight = 0

    @classmethod
    async def start(cls, expert: ExpertConfig) -> "RemoteEngine":
        """Loading a remote expert is checking that the upstream answers and lists the model."""
        options = expert.engine
        headers: dict[str, str] = {}
        if options.api_key_env:
            key = os.environ.get(options.api_key_env)
            if not key:
                raise EngineError(f"the environment variable {options.api_key_env} named by engine.api_key_env "
                                  "is not set")
            headers["Authorization"] = f"Bearer {key}"
        session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=expert.max_concurrency, keepalive_timeout=_KEEPALIVE_S),
            # sock_connect, not connect: the latter also counts waiting for a pooled connection
            timeout=aiohttp.ClientTimeout(sock_connect=options.connect_timeout_s, sock_read=options.read_timeout_s))
        engine = cls(expert, session)
        try:
            await engine._check_model()
        except BaseException:
            await session.close()
            raise
        log.info("expert %s is served by %s as %s", expert.id, engine.base_url, engine.model)
        return engine

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def shutdown(self) -> None:
        await self._session.close()

    # ------------------------------------------------------------ requests

    async def _check_model(self) -> None:
        try:
            async with self._session.get(f"{self.base_url}/v1/models") as response:
                await self._check_status(response)
                listing = orjson.loads(await response.read())
            served = [entry["id"] for entry in listing["data"]]
        except APIError as error:
            raise EngineError(error.message) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise EngineError(self._failure(error).message) from None
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"{self._where} answered its model list in a shape that is not OpenAI's") from None
        if self.model not in served:
            raise EngineError(f"{self._where} does not serve the model '{self.model}' "
                              f"(it lists: {', '.join(map(str, served)) or 'nothing'})")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        chat = request.messages is not None
        url = f"{self.base_url}/v1/{'chat/completions' if chat else 'completions'}"
        self._in_flight += 1
        try:
            async with self._session.post(url, json=self._body(request)) as response:
                await self._check_status(response)
                try:
                    async for delta in self._deltas(response, chat):
                        yield delta
                except BaseException:
                    response.close()  # early close, cancellation or error: the upstream sees the disconnect
                    raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise self._failure(error) from None
        finally:
            self._in_flight -= 1

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        """The OpenAI request; fields at their neutral value are left out, for servers that do not know them."""
        settings = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": settings.max_tokens, "temperature": settings.temperature, "top_p": settings.top_p,
            "n": settings.n, "presence_penalty": settings.presence_penalty,
            "frequency_penalty": settings.frequency_penalty,
        }
        if request.messages is not None:
            body["messages"] = images_in_last_user_turn(
                request.messages, [{"type": "image_url", "image_url": {"url": image.url}} for image in request.images])
        else:
            body["prompt"] = request.prompt
        if settings.top_k > 0:
            body["top_k"] = settings.top_k
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty  # a vLLM extension
        return body

    async def _deltas(self, response: aiohttp.ClientResponse, chat: bool) -> AsyncIterator[GenerationDelta]:
        """Chunks as deltas, one token per text chunk until the upstream's usage says how many there were."""
        counted = prompt_tokens = 0
        async for event in _sse_events(response):
            if "error" in event or event.get("object") == "error":
                message = _error_fields(event).get("message") or "an error event without a message"
                raise APIError(502, f"{self._where} failed while generating: {message}", type="server_error",
                               code="upstream_error")
            for choice in event.get("choices") or ():
                text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                if text or choice.get("finish_reason"):
                    tokens = 1 if text else 0
                    counted += tokens
                    yield GenerationDelta(choice.get("index", 0), text, tokens, prompt_tokens,
                                          choice.get("finish_reason"))
            usage = event.get("usage")
            if usage:  # the last chunk (or every chunk, with vLLM's continuous usage stats)
                prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                total = usage.get("completion_tokens", counted)
                yield GenerationDelta(0, "", total - counted, prompt_tokens)
                counted = total

    # ------------------------------------------------------------ errors

    @property
    def _where(self) -> str:
        return f"the upstream of expert '{self.expert.id}' ({self.base_url})"

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        """A 4xx the client caused passes through as it is; anything else is the upstream's or the operator's."""
        if response.status < 400:
            return
        raw = await response.read()
        try:
            fields = _error_fields(orjson.loads(raw))
        except ValueError:
            fields = {}
        message = fields.get("message") or raw[:300].decode(errors="replace").strip() or response.reason or ""
        retry_after = _retry_after(response.headers.get("Retry-After"))
        status = response.status
        if status < 500 and status not in _OPERATOR_STATUSES:
            strings = {name: value for name, value in fields.items() if isinstance(value, str)}  # vLLM's code is an int
            raise APIError(status, message, type=strings.get("type", "invalid_request_error"),
                           param=strings.get("param"), code=strings.get("code"), retry_after=retry_after)
        if status == 503:
            raise unavailable(f"{self._where} is unavailable (HTTP 503: {message})",
                              retry_after=retry_after or 1.0, code="upstream_unavailable")
        raise APIError(502, f"{self._where} answered HTTP {status}: {message}", type="server_error",
                       code="upstream_error")

    def _failure(self, error: Exception) -> APIError:
        """The client's view of a transport failure: unreachable 503, silent 504, anything else 502."""
        if isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            return unavailable(f"{self._where} is unreachable ({error})", code="upstream_unavailable")
        if isinstance(error, TimeoutError):
            return APIError(504, f"{self._where} sent nothing for {self.expert.engine.read_timeout_s:g} s "
                                 "(engine.read_timeout_s)", type="timeout_error", code="upstream_timeout",
                            retry_after=1.0)
        return APIError(502, f"{self._where} failed mid-response ({error or type(error).__name__})",
                        type="server_error", code="upstream_error")


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream up to `[DONE]`; a stream cut off before it is an upstream failure."""
    data: list[bytes] = []
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif not line and data:
            payload, data = b"\n".join(data), []
            if payload == b"[DONE]":
                return
            yield orjson.loads(payload)
    raise aiohttp.ClientPayloadError("the stream ended before [DONE]")


def _error_fields(payload: Any) -> dict[str, Any]:
    """The OpenAI error object of a body or SSE event: {"error": {...}}, or older vLLM's fields at the top."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error
    return {}


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
