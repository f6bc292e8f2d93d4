"""The narrow engine interface every expert is served through, and the factory that picks one.

An engine turns a `GenerationRequest` into an async stream of `GenerationDelta`s (text deltas with
token counts and finish reasons). Leaving the stream early aborts the request in the engine.
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.config import ExpertConfig


class EngineError(Exception):
    """The engine failed a request or died; the request may be retried once the expert reloads."""


class PromptTooLong(ValueError):
    """The prompt does not fit the expert's context window (a client error, 400)."""


@dataclass(frozen=True)
class SamplingSettings:
    """Fully resolved sampling for one request (client values over expert defaults)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """Either chat messages (the engine applies its chat template) or a raw text prompt."""

    request_id: str
    sampling: SamplingSettings
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    images: tuple[Any, ...] = ()  # core.protocol.ImagePart, for vision experts


@dataclass(frozen=True)
class GenerationDelta:
    """New text for one choice. `prompt_tokens` is the request's prompt size as known so far: a remote engine
    learns it only from the upstream's final usage, so consumers keep the last delta's value."""

    index: int
    text: str
    new_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


def images_in_last_user_turn(messages: tuple[dict[str, Any], ...], image_parts: list[dict[str, Any]]
                             ) -> list[dict[str, Any]]:
    """The request keeps images aside (core.protocol.ImagePart); an engine puts its own form of them back
    into the last user turn, after its text, as OpenAI clients send them and vision chat templates accept them."""
    turns = [dict(message) for message in messages]
    if image_parts:
        last = max(i for i, turn in enumerate(turns) if turn["role"] == "user")
        turns[last]["content"] = [{"type": "text", "text": turns[last]["content"]}, *image_parts]
    return turns


@dataclass
class EngineInfo:
    """What an engine actually runs with, for /v1/models and /stats."""

    kind: str
    effective: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Engine(abc.ABC):
    info: EngineInfo

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until every choice has a finish reason; closing the stream aborts the request."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Requests the engine itself still holds (not yet finished or aborted)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and free its memory."""


async def create_engine(expert: ExpertConfig) -> Engine:
    """Build and start the engine an expert's config asks for."""
    kind = expert.engine.kind
    if kind == "vllm":
        from core.engines.vllm_local import VLLMEngine
        return await VLLMEngine.start(expert)
    if kind == "test":
        from core.engines.scripted import ScriptedEngine
        return await ScriptedEngine.start(expert)
    if kind == "remote":
        from core.engines.remote import RemoteEngine
        return await RemoteEngine.start(expert)
    raise ValueError(f"unknown engine kind {kind!r}")
