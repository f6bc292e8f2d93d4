"""The request pipeline shared by every front: parsed request -> expert -> lease -> runner -> relayed answer.

`CompletionService.chat()` / `.completion()` pick the expert (the named one, or the router's choice) and build
the body the runner gets: the expert's system prompt and sampling defaults where the client left them out, the
front's priority, the runner's model name. The returned `Job` relays the runner's JSON answer or SSE chunks with
the expert's id as their model. Upstream and host failures become OpenAI-shaped errors here, in one place.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from core.config import AppConfig, ExpertConfig
from core.host.protocol import Grant
from core.front.host_client import HostClient, HostRefused, HostUnavailable
from core.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, invalid, tiered_priority,
                           unavailable)
from core.router import RouteDecision, Router
from core.front.request_log import note_usage, runner_headers
from core.front.stats import Stats
from core.upstream import Failure, Upstream, UpstreamError

log = logging.getLogger(__name__)
CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"


def engine_messages(expert: ExpertConfig, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as the runner gets it: the expert's system prompt first unless the client sent one."""
    turns = [message.model_dump(exclude_none=True) for message in messages]
    for turn in turns:
        if turn["role"] == "developer":  # small models' chat templates know only "system"
            turn["role"] = "system"
    if expert.system_prompt and not any(turn["role"] == "system" for turn in turns):
        turns.insert(0, {"role": "system", "content": expert.system_prompt})
    return turns


def with_defaults(body: dict[str, Any], expert: ExpertConfig) -> dict[str, Any]:
    """The expert's sampling defaults for what the client left out."""
    defaults = expert.sampling
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = defaults.max_tokens
    body.setdefault("temperature", defaults.temperature)
    body.setdefault("top_p", defaults.top_p)
    if defaults.top_k > 0:
        body.setdefault("top_k", defaults.top_k)
    if defaults.repetition_penalty != 1.0:
        body.setdefault("repetition_penalty", defaults.repetition_penalty)
    if forces_a_tool_call(body) and defaults.tool_call_frequency_penalty:
        body.setdefault("frequency_penalty", defaults.tool_call_frequency_penalty)
    return body


def forces_a_tool_call(body: dict[str, Any]) -> bool:
    """tool_choice "required" or naming a function, with tools given: the answer must be a call."""
    choice = body.get("tool_choice")
    return bool(body.get("tools")) and (choice == "required" or isinstance(choice, dict))


@dataclass(frozen=True)
class Answer:
    """A whole chat answer's text or tool calls, for consensus."""

    text: str
    finish_reason: str | None
    usage: dict[str, int]
    tool_calls: tuple[dict[str, Any], ...] = ()


class CompletionService:
    def __init__(self, kind: str, config: AppConfig, host: HostClient, router: Router, stats: Stats):
        self.kind = kind
        self.config = config
        self.host = host
        self.router = router
        self.stats = stats
        self.priority = config.server.priorities["streaming" if kind == "streaming" else "standard"]
        self._upstreams: dict[str, tuple[tuple[str, str | None, str | None], Upstream]] = {}
        self._reported: dict[str, str | None] = {}
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        for _, upstream in self._upstreams.values():
            await upstream.close()

    # ------------------------------------------------------------ choosing the expert

    def route_chat(self, request: ChatCompletionRequest) -> RouteDecision:
        return self._recorded(self.router.route(request.messages, tools=request.calls_tools))

    def route_prompt(self, request: CompletionRequest) -> RouteDecision:
        """A text completion is routed by its first prompt."""
        return self._recorded(self.router.route_prompt(request.prompts[0]))

    def _recorded(self, decision: RouteDecision) -> RouteDecision:
        self.stats.record_route(decision.expert, decision.elapsed_ms)
        return decision

    def select(self, model: str | None, route: Callable[[], RouteDecision]
               ) -> tuple[ExpertConfig, RouteDecision | None]:
        if model is None:
            decision = route()
            return self.config.expert(decision.expert), decision
        expert = self.config.expert(model)
        if expert is None:
            raise APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the experts",
                           param="model", code="model_not_found")
        return expert, None

    def chat(self, request: ChatCompletionRequest) -> "Job":
        expert, decision = self.select(request.model, lambda: self.route_chat(request))
        if request.has_images and not expert.vision:
            raise invalid("messages", f"expert '{expert.id}' cannot read images (its model is text-only); "
                                      "send the text alone or use a vision-capable expert", "images_not_supported")
        if request.calls_tools and not expert.calls_tools:
            raise invalid("tools", f"expert '{expert.id}' cannot call tools (its runner has no tool-call parser, "
                                   "engine.tool_call_parser); name an expert that can, or send no model",
                          "tools_not_supported")
        body = self.chat_body(expert, request, request.messages)
        return Job(self, expert, decision, CHAT_PATH, body, request.stream, request.include_usage)

    def completion(self, request: CompletionRequest) -> "Job":
        expert, decision = self.select(request.model, lambda: self.route_prompt(request))
        body = with_defaults(self._client_fields(request, exclude={"model"}), expert)
        return Job(self, expert, decision, COMPLETION_PATH, body, request.stream, request.include_usage)

    def chat_body(self, expert: ExpertConfig, request: ChatCompletionRequest, messages: Sequence[ChatMessage],
                  **overrides: Any) -> dict[str, Any]:
        """A chat request for the expert's runner: the client's fields, the expert's prompt and defaults."""
        body = self._client_fields(request, exclude={"model", "messages"})
        body["messages"] = engine_messages(expert, messages)
        body.update(overrides)
        return with_defaults(body, expert)

    def _client_fields(self, request: ChatCompletionRequest | CompletionRequest, exclude: set[str]) -> dict[str, Any]:
        body = request.model_dump(exclude_none=True, by_alias=True,
                                  exclude=exclude | {"stream_options", "priority", "engine_fields"})
        body["priority"] = tiered_priority(self.priority, request.priority)
        if request.stream:
            body["stream_options"] = {
                "include_usage": True,  # the front counts tokens; the usage chunk goes to the client if it asked
                "continuous_usage_stats": bool(request.stream_options and request.stream_options.continuous_usage_stats)}
        return body

    # ------------------------------------------------------------ running on a runner

    async def complete(self, expert: ExpertConfig, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A whole answer from the expert's runner, with the expert's id as its model."""
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + expert.request_timeout_s
        usage: dict[str, Any] = {}
        failure: APIError | None = None
        try:
            async with self._lease(expert, body, deadline) as (grant, upstream), asyncio.timeout_at(deadline):
                answer = await upstream.complete(path, {**body, "model": grant.model}, deadline, runner_headers())
            answer["model"] = expert.id
            usage = answer.get("usage") or {}
            return answer
        except BaseException as error:
            failure = self._failure(expert, error)
            if failure is None:
                raise
            raise failure from None
        finally:
            self._finish(expert, started, usage, ttft=None, failure=failure)

    async def stream(self, expert: ExpertConfig, path: str, body: dict[str, Any], include_usage: bool
                     ) -> AsyncIterator[dict[str, Any]]:
        """The runner's chunks as they arrive. The request deadline covers waiting for the runner, never the
        time a chunk spends with the client."""
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + expert.request_timeout_s
        ttft: float | None = None
        usage: dict[str, Any] = {}
        failure: APIError | None = None
        counters = self.stats.expert(expert.id)
        counters.active_streams += 1
        try:
            async with self._lease(expert, body, deadline) as (grant, upstream):
                relayed = upstream.stream(path, {**body, "model": grant.model}, deadline, runner_headers())
                async with aclosing(relayed) as events:
                    while True:
                        async with asyncio.timeout_at(deadline):
                            event = await anext(events, None)
                        if event is None:
                            break
                        event["model"] = expert.id
                        if event.get("usage") and not event.get("choices"):
                            usage = event["usage"]
                            if not include_usage:
                                continue
                        elif ttft is None and _has_output(event):
                            ttft = time.monotonic() - started
                        if not include_usage:
                            event.pop("usage", None)
                        yield event
        except BaseException as error:
            failure = self._failure(expert, error)
            if failure is None:
                raise
            raise failure from None
        finally:
            counters.active_streams -= 1
            self._finish(expert, started, usage, ttft, failure)

    async def chat_answer(self, expert: ExpertConfig, request: ChatCompletionRequest,
                          messages: Sequence[ChatMessage], **overrides: Any) -> Answer:
        """One expert's whole chat answer as text (consensus candidates)."""
        body = self.chat_body(expert, request, messages, **overrides)
        body.pop("stream_options", None)
        answer = await self.complete(expert, CHAT_PATH, {**body, "stream": False})
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        return Answer(message.get("content") or "", choice.get("finish_reason"), answer.get("usage") or {},
                      tuple(message.get("tool_calls") or ()))

    @asynccontextmanager
    async def _lease(self, expert: ExpertConfig, body: dict[str, Any], deadline: float
                     ) -> AsyncIterator[tuple[Grant, Upstream]]:
        """The host's lease on the expert, at the request's priority, and the client for the runner it grants.
        Waiting for it counts against the request's deadline (loop time): past it, a retryable 503."""
        async with AsyncExitStack() as stack:
            waiting = asyncio.timeout_at(deadline)
            try:
                async with waiting:
                    grant = await stack.enter_async_context(self.host.lease(expert.id, body.get("priority", 0)))
            except TimeoutError:
                if not waiting.expired():
                    raise
                raise unavailable(f"expert '{expert.id}' had no free slot within its {expert.request_timeout_s:g} s "
                                  "timeout; retry shortly", code="queue_timeout") from None
            yield grant, self.upstream_for(expert, grant)

    def upstream_for(self, expert: ExpertConfig, grant: Grant) -> Upstream:
        """One pooled client per runner; a restarted runner (a new socket and key, or a new URL) gets a new one."""
        identity = (grant.base_url, grant.socket, grant.api_key)
        known = self._upstreams.get(grant.runner)
        if known is not None and known[0] == identity:
            return known[1]
        if known is not None:
            self._spawn(known[1].close())
        options = expert.engine
        if grant.socket:  # our runner: its socket and this start's key; the request's deadline bounds a silence
            upstream = Upstream("", where=f"its runner ({grant.runner})", unix_socket=grant.socket,
                                api_key=grant.api_key, connect_timeout_s=options.connect_timeout_s,
                                read_timeout_s=None, max_connections=256)
        else:
            upstream = Upstream(grant.base_url, where=f"its upstream ({grant.base_url})",
                                api_key_env=options.api_key_env, connect_timeout_s=options.connect_timeout_s,
                                read_timeout_s=options.read_timeout_s, max_connections=256)
        self._upstreams[grant.runner] = (identity, upstream)
        return upstream

    # ------------------------------------------------------------ outcomes

    def _failure(self, expert: ExpertConfig, error: BaseException) -> APIError | None:
        """The client's view of a failure, or None for what is not one (a cancelled request)."""
        if isinstance(error, APIError):
            return error
        if isinstance(error, HostRefused):
            fields = error.fields
            return APIError(error.status, f"expert '{expert.id}': {error}", type=fields.get("type", "server_error"),
                            code=fields.get("code"), retry_after=error.retry_after)
        if isinstance(error, HostUnavailable):
            return unavailable(str(error), code="host_unavailable")
        if isinstance(error, TimeoutError):
            return APIError(504, f"expert '{expert.id}' did not finish within {expert.request_timeout_s:g} s",
                            type="timeout_error", code="timeout", retry_after=1.0)
        if isinstance(error, UpstreamError):
            return _upstream_error(expert, error)
        return None

    def _finish(self, expert: ExpertConfig, started: float, usage: dict[str, Any], ttft: float | None,
                failure: APIError | None) -> None:
        failed = failure is not None and failure.status >= 500
        note_usage(expert.id, usage)
        self.stats.record_generation(expert.id, seconds=time.monotonic() - started,
                                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                     completion_tokens=int(usage.get("completion_tokens") or 0), ttft=ttft,
                                     ok=not failed)
        error = failure.message if failed and failure.code not in _HOST_CODES else None
        if failure is None or failed:
            if self._reported.get(expert.id) != error:
                self._reported[expert.id] = error
                self._spawn(self.host.report(expert.id, error))

    def _spawn(self, coroutine) -> None:
        """Fire and forget, but keep a reference until done (the loop holds tasks only weakly)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# Refusals the host itself gave (it already shows them in /health); only runner and upstream failures are reported.
_HOST_CODES = {"queue_full", "expert_loading", "expert_load_failed", "capacity", "expert_unloaded",
               "restart_backoff", "shutting_down", "host_unavailable", "queue_timeout"}


def _has_output(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
    return False


def _upstream_error(expert: ExpertConfig, error: UpstreamError) -> APIError:
    """Statuses for what went wrong upstream: the client's mistakes pass through, ours are 5xx."""
    failure = error.failure
    if failure is Failure.REJECTED:
        fields = {name: value for name, value in error.fields.items() if isinstance(value, str)}  # vLLM's code is an int
        if "maximum context length" in error.message:  # the code OpenAI clients look for
            fields["code"] = "context_length_exceeded"
        return APIError(error.status or 400, error.message, type=fields.get("type", "invalid_request_error"),
                        param=fields.get("param"), code=fields.get("code"), retry_after=error.retry_after)
    message = f"expert '{expert.id}': {error.message}"
    if failure is Failure.TIMEOUT:
        return APIError(504, message, type="timeout_error", code="upstream_timeout", retry_after=1.0)
    if expert.engine.kind == "vllm":  # our own runner went away or broke: the host restarts it
        return unavailable(f"{message}; retry the request", code="engine_failed")
    if failure in (Failure.UNREACHABLE, Failure.UNAVAILABLE):
        return unavailable(message, retry_after=error.retry_after or 1.0, code="upstream_unavailable")
    return APIError(502, message, type="server_error", code="upstream_error")


class Job:
    """One accepted request, bound to the expert that will answer it."""

    def __init__(self, service: CompletionService, expert: ExpertConfig, route: RouteDecision | None, path: str,
                 body: dict[str, Any], stream: bool, include_usage: bool):
        self.service = service
        self.expert = expert
        self.route = route
        self.path = path
        self.body = body
        self.streaming = stream
        self.include_usage = include_usage

    def headers(self) -> dict[str, str]:
        headers = {"X-Capibara-Expert": self.expert.id}
        if self.route is not None:
            headers["X-Capibara-Route-Score"] = f"{self.route.confidence:.4f}"
            headers["X-Capibara-Route-Reason"] = self.route.reason
        return headers

    async def complete(self) -> dict[str, Any]:
        return await self.service.complete(self.expert, self.path, self.body)

    def stream(self) -> AsyncIterator[dict[str, Any]]:
        return self.service.stream(self.expert, self.path, self.body, self.include_usage)
