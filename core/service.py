"""The request pipeline shared by every server: parsed request -> expert -> engine -> rendered response.

`CompletionService.chat()` / `.completion()` pick the expert (the named one, or the router's choice)
and return a `Job`; the HTTP layer then asks the job for a full response or a stream of chunks.
Engine failures are turned into OpenAI-shaped errors here, in one place.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from core.config import AppConfig, ExpertConfig, SamplingDefaults
from core.engines import (EngineError, GenerationDelta, GenerationRequest, PromptTooLong, SamplingSettings)
from core.model_manager import ModelManager
from core.protocol import (APIError, ChatMessage, ChatRequest, Choice, CompletionRequest, ResponseHead,
                           SamplingRequest, Usage, invalid, render_chunk, render_response, render_usage_chunk,
                           unavailable)
from core.router import RouteDecision, Router
from core.stats import Stats


def resolve_sampling(request: SamplingRequest, defaults: SamplingDefaults) -> SamplingSettings:
    """Client values where given, the expert's defaults elsewhere."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SamplingSettings(
        max_tokens=pick(request.max_tokens, defaults.max_tokens),
        temperature=pick(request.temperature, defaults.temperature),
        top_p=pick(request.top_p, defaults.top_p),
        top_k=pick(request.top_k, defaults.top_k),
        n=request.n,
        stop=request.stop,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty),
    )


def engine_messages(expert: ExpertConfig, messages: Sequence[ChatMessage]) -> tuple[dict[str, Any], ...]:
    """The conversation as the engine sees it: the expert's system prompt first unless the client sent one."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if expert.system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": expert.system_prompt})
    return tuple(turns)


def chat_generation(expert: ExpertConfig, messages: Sequence[ChatMessage], sampling: SamplingSettings
                    ) -> GenerationRequest:
    """A chat turn for the engine: the expert's view of the conversation, its images kept aside."""
    return GenerationRequest(request_id="", sampling=sampling, messages=engine_messages(expert, messages),
                             images=tuple(image for message in messages for image in message.images))


@dataclass
class Generation:
    """The outcome of a finished generation: choices by index and the token usage."""

    choices: list[Choice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


async def collect(deltas: AsyncIterator[tuple[int, GenerationDelta]], width: int = 1) -> Generation:
    """A whole answer from its deltas; `width` is n, so that choice index // width names the prompt."""
    choices: dict[int, Choice] = {}
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    async with aclosing(deltas):
        async for index, delta in deltas:
            choice = choices.setdefault(index, Choice(index))
            choice.text += delta.text
            choice.finish_reason = delta.finish_reason or choice.finish_reason
            prompt_tokens[index // width] = delta.prompt_tokens
            completion_tokens += delta.new_tokens
    return Generation(sorted(choices.values(), key=lambda c: c.index),
                      Usage(sum(prompt_tokens.values()), completion_tokens))


class CompletionService:
    def __init__(self, config: AppConfig, manager: ModelManager, router: Router, stats: Stats):
        self.config = config
        self.manager = manager
        self.router = router
        self.stats = stats

    # ------------------------------------------------------------ choosing the expert

    def route_chat(self, request: ChatRequest) -> RouteDecision:
        return self._recorded(self.router.route(request.messages))

    def route_prompt(self, request: CompletionRequest) -> RouteDecision:
        """A text completion is routed by its first prompt."""
        return self._recorded(self.router.route_prompt(request.prompts[0]))

    def _recorded(self, decision: RouteDecision) -> RouteDecision:
        self.stats.record_route(decision.expert, decision.elapsed_ms)
        return decision

    def select(self, model: str | None, route: Callable[[], RouteDecision]) -> tuple[ExpertConfig, RouteDecision | None]:
        if model is None:
            decision = route()
            return self.config.expert(decision.expert), decision
        expert = self.config.expert(model)
        if expert is None:
            raise APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the experts",
                           param="model", code="model_not_found")
        return expert, None

    def chat(self, request: ChatRequest) -> "Job":
        expert, decision = self.select(request.model, lambda: self.route_chat(request))
        if request.has_images and not expert.vision:
            raise invalid("messages", f"expert '{expert.id}' cannot read images (its model is text-only); "
                                      "send the text alone or use a vision-capable expert", "images_not_supported")
        generation = chat_generation(expert, request.messages, resolve_sampling(request.sampling, expert.sampling))
        return Job(self, "chat", expert, decision, [generation], request.include_usage)

    def completion(self, request: CompletionRequest) -> "Job":
        expert, decision = self.select(request.model, lambda: self.route_prompt(request))
        sampling = resolve_sampling(request.sampling, expert.sampling)
        generations = [GenerationRequest(request_id="", sampling=sampling, prompt=p) for p in request.prompts]
        return Job(self, "text", expert, decision, generations, request.include_usage)

    # ------------------------------------------------------------ running on an engine

    async def deltas(self, expert: ExpertConfig, requests: list[GenerationRequest]
                     ) -> AsyncIterator[tuple[int, GenerationDelta]]:
        """Run the requests on the expert's engine; yields (choice index, delta), aborting on early exit."""
        started = time.monotonic()
        first_token: float | None = None
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        failed = False  # the expert's fault; a client's bad input or early exit is not
        try:
            async with asyncio.timeout(expert.request_timeout_s), self.manager.use(expert.id) as engine:
                streams = [engine.generate(_with_id(r)) for r in requests]
                width = requests[0].sampling.n
                async with aclosing(_merge(streams)) as merged:
                    async for position, delta in merged:
                        prompt_tokens[position] = delta.prompt_tokens
                        completion_tokens += delta.new_tokens
                        if first_token is None and delta.new_tokens:
                            first_token = time.monotonic() - started
                        yield position * width + delta.index, delta
            self.manager.request_outcome(expert.id, None)
        except PromptTooLong as error:
            raise invalid("messages" if requests[0].messages is not None else "prompt", str(error),
                          "context_length_exceeded") from None
        except EngineError as error:
            failed = True
            self.manager.engine_failed(expert.id, error)
            raise unavailable(f"expert '{expert.id}' failed while generating; retry the request",
                              code="engine_failed") from None
        except TimeoutError:
            failed = True
            message = f"expert '{expert.id}' did not finish within {expert.request_timeout_s:g} s"
            self.manager.request_outcome(expert.id, message)
            raise APIError(504, message, type="timeout_error", code="timeout", retry_after=1.0) from None
        except ValueError as error:  # vLLM rejected the sampling parameters
            raise invalid(None, f"the engine rejected the request: {error}") from None
        except APIError as error:  # from the model manager (loading, capacity) or a remote upstream
            failed = error.status >= 500
            if failed:
                self.manager.request_outcome(expert.id, error.message)
            raise
        finally:
            self.stats.record_generation(expert.id, seconds=time.monotonic() - started,
                                         prompt_tokens=sum(prompt_tokens.values()),
                                         completion_tokens=completion_tokens, ttft=first_token, ok=not failed)

    async def generate(self, expert: ExpertConfig, requests: list[GenerationRequest]) -> Generation:
        return await collect(self.deltas(expert, requests), requests[0].sampling.n)


class Job:
    """One accepted request, bound to the expert that will answer it."""

    def __init__(self, service: CompletionService, kind: str, expert: ExpertConfig, route: RouteDecision | None,
                 requests: list[GenerationRequest], include_usage: bool):
        self.service = service
        self.kind = kind
        self.expert = expert
        self.route = route
        self.requests = requests
        self.include_usage = include_usage

    def headers(self) -> dict[str, str]:
        headers = {"X-Capibara-Expert": self.expert.id}
        if self.route is not None:
            headers["X-Capibara-Route-Score"] = f"{self.route.confidence:.4f}"
            headers["X-Capibara-Route-Reason"] = self.route.reason
        return headers

    async def complete(self) -> dict[str, Any]:
        generation = await self.service.generate(self.expert, self.requests)
        return render_response(ResponseHead.new(self.kind, self.expert.id), generation.choices, generation.usage)

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        """Chunks as the engine produces them; raises APIError before the first chunk if it cannot start."""
        head = ResponseHead.new(self.kind, self.expert.id)
        stats = self.service.stats.expert(self.expert.id)
        started: set[int] = set()
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        width = self.requests[0].sampling.n
        stats.active_streams += 1
        try:
            async with aclosing(self.service.deltas(self.expert, self.requests)) as deltas:
                async for index, delta in deltas:
                    prompt_tokens[index // width] = delta.prompt_tokens
                    completion_tokens += delta.new_tokens
                    first = self.kind == "chat" and index not in started
                    started.add(index)
                    if delta.text or first or delta.finish_reason:
                        yield render_chunk(head, index, delta.text, delta.finish_reason, role=first)
            if self.include_usage:
                yield render_usage_chunk(head, Usage(sum(prompt_tokens.values()), completion_tokens))
        finally:
            stats.active_streams -= 1


def _with_id(request: GenerationRequest) -> GenerationRequest:
    return replace(request, request_id=uuid.uuid4().hex)


async def _merge(streams: list[AsyncIterator[GenerationDelta]]) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Interleave several engine streams as their deltas arrive; closing this closes (aborts) them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: AsyncIterator[GenerationDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put((position, delta))
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(error)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
