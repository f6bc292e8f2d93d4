"""The one client for OpenAI-compatible upstreams: local runners the host started, and remote experts.

It posts a request body and returns the JSON answer, or the SSE stream's events as they arrive. Leaving a
stream early closes the connection, which vLLM (and Capibara6) take as an abort. A local runner is reached on its
unix socket (checked to be this user's) with the key of its current start; a remote one over TCP. How long a
request may wait for bytes is its own deadline's business, not a fixed figure. Failures are raised as
`UpstreamError`s that say what happened; the HTTP layer decides what status a client sees.
"""
from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from core.local_ipc import SameUserConnector

# `vllm serve` closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): drop ours sooner, so
# that a request never goes out on a connection the server is closing.
_KEEPALIVE_S = 4.0


class Failure(str, enum.Enum):
    UNREACHABLE = "unreachable"   # nothing listens, or the connection was refused
    TIMEOUT = "timeout"           # it accepted the request but sent nothing for read_timeout_s or until the deadline
    BROKEN = "broken"             # the answer stopped half-way or is not OpenAI-shaped
    UNAVAILABLE = "unavailable"   # it answered 503
    MISCONFIGURED = "misconfigured"  # 401/403/404: our key, URL or model name is wrong, not the client's request
    REJECTED = "rejected"         # it refused the client's request (another 4xx): the client's to fix
    FAILED = "failed"             # any other 5xx, or an error event mid-stream


class UpstreamError(Exception):
    """What went wrong upstream. For REJECTED, `status` and `fields` carry the upstream's own OpenAI error."""

    def __init__(self, failure: Failure, message: str, *, status: int | None = None,
                 fields: dict[str, Any] | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.failure = failure
        self.message = message
        self.status = status
        self.fields = fields or {}
        self.retry_after = retry_after


class Upstream:
    """An OpenAI-compatible server at `base_url` (or on the unix socket `unix_socket`, with `api_key`), with a
    pooled session of at most `max_connections`. `read_timeout_s` caps a silence even before the request's
    deadline; None leaves it to the deadline alone."""

    def __init__(self, base_url: str, *, where: str, api_key_env: str | None = None, api_key: str | None = None,
                 unix_socket: str | None = None, connect_timeout_s: float = 5.0,
                 read_timeout_s: float | None = 120.0, max_connections: int = 64):
        self.base_url = base_url.rstrip("/").removesuffix("/v1") if not unix_socket else "http://runner"
        self.where = where
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        headers: dict[str, str] = {}
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise UpstreamError(Failure.MISCONFIGURED, f"the environment variable {api_key_env} named by "
                                                           "engine.api_key_env is not set")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        connector = (SameUserConnector(unix_socket, limit=max_connections, keepalive_timeout=_KEEPALIVE_S)
                     if unix_socket else aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=_KEEPALIVE_S))
        self._session = aiohttp.ClientSession(
            headers=headers, connector=connector, json_serialize=lambda value: orjson.dumps(value).decode(),
            timeout=self._timeout(None))

    def _timeout(self, deadline: float | None) -> aiohttp.ClientTimeout:
        """sock_connect, not connect: the latter also counts waiting for a pooled connection. A silence may last
        until the deadline (loop time), and no longer than read_timeout_s."""
        limits = [limit for limit in (self.read_timeout_s,
                                      None if deadline is None else deadline - asyncio.get_running_loop().time())
                  if limit is not None]
        return aiohttp.ClientTimeout(sock_connect=self.connect_timeout_s,
                                     sock_read=max(0.001, min(limits)) if limits else None)

    async def close(self) -> None:
        await self._session.close()

    async def models(self) -> list[str]:
        """The model names the upstream serves."""
        try:
            async with self._session.get(f"{self.base_url}/v1/models") as response:
                await self._check_status(response)
                listing = orjson.loads(await response.read())
            return [str(entry["id"]) for entry in listing["data"]]
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._transport(error) from None
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(Failure.BROKEN, f"{self.where} answered its model list in a shape that is not "
                                                "OpenAI's") from None

    async def complete(self, path: str, body: dict[str, Any], deadline: float | None = None,
                       headers: dict[str, str] | None = None) -> dict[str, Any]:
        """POST a non-streamed request; the decoded JSON answer."""
        try:
            async with self._session.post(f"{self.base_url}{path}", json=body, headers=headers,
                                          timeout=self._timeout(deadline)) as response:
                await self._check_status(response)
                answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._transport(error) from None
        except ValueError:
            raise UpstreamError(Failure.BROKEN, f"{self.where} answered with something that is not JSON") from None
        if not isinstance(answer, dict):
            raise UpstreamError(Failure.BROKEN, f"{self.where} answered with something that is not an object")
        return answer

    async def stream(self, path: str, body: dict[str, Any], deadline: float | None = None,
                     headers: dict[str, str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """POST a streamed request; its SSE events up to [DONE]. Closing the iterator closes the connection."""
        try:
            async with self._session.post(f"{self.base_url}{path}", json=body, headers=headers,
                                          timeout=self._timeout(deadline)) as response:
                await self._check_status(response)
                try:
                    async for event in _sse_events(response):
                        if "error" in event or event.get("object") == "error":
                            message = _error_fields(event).get("message") or "an error event without a message"
                            raise UpstreamError(Failure.FAILED, f"{self.where} failed while generating: {message}")
                        yield event
                except BaseException:
                    response.close()  # early close, cancellation or error: the upstream sees the disconnect
                    raise
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._transport(error) from None
        except ValueError:
            raise UpstreamError(Failure.BROKEN, f"{self.where} sent an event that is not JSON") from None

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
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
        if status in (401, 403, 404):
            raise UpstreamError(Failure.MISCONFIGURED, f"{self.where} answered HTTP {status}: {message}",
                                status=status)
        if status < 500:
            raise UpstreamError(Failure.REJECTED, message, status=status, fields=fields, retry_after=retry_after)
        if status == 503:
            raise UpstreamError(Failure.UNAVAILABLE, f"{self.where} is unavailable (HTTP 503: {message})",
                                status=status, retry_after=retry_after)
        raise UpstreamError(Failure.FAILED, f"{self.where} answered HTTP {status}: {message}", status=status)

    def _transport(self, error: Exception) -> UpstreamError:
        if isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            return UpstreamError(Failure.UNREACHABLE, f"{self.where} is unreachable ({error})")
        if isinstance(error, TimeoutError):
            return UpstreamError(Failure.TIMEOUT, f"{self.where} sent nothing in time (engine.read_timeout_s "
                                                  "or the request's timeout)")
        return UpstreamError(Failure.BROKEN, f"{self.where} failed mid-response ({error or type(error).__name__})")


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream up to `[DONE]`; a stream cut off before it is a broken upstream."""
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
