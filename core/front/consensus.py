"""Consensus (port 8084): the router's best few experts answer in parallel, one aggregator writes the answer.

This is the Mixture-of-Agents pattern. The candidates that can take the input run concurrently, each with its
own deadline. A candidate that fails or times out is dropped and reported. The aggregator then reads the
conversation and the surviving answers and writes one better answer. If the aggregator fails, the answer is
the candidate that agrees most with the others (the TF-IDF medoid). Data flows one way:
request -> plan -> candidates -> synthesis -> render. A request that names a model is served by that expert
alone, as on the other servers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from core.config import AppConfig, ExpertConfig
from core.protocol import (APIError, ChatCompletionRequest, ChatMessage, invalid, new_id, render_chat_chunk,
                           render_chat_response, tiered_priority, unavailable)
from core.front.service import CHAT_PATH, Answer, Job
from core.front.stats import Stats
from core.router import RouteDecision

log = logging.getLogger(__name__)


class ExpertCalls(Protocol):
    """All that consensus asks of the completion pipeline (`CompletionService`): route, build a body, call one
    expert whole or streamed, and serve a named model as usual. The pipeline never calls consensus."""

    config: AppConfig
    stats: Stats

    def chat(self, request: ChatCompletionRequest) -> Job: ...

    def route_chat(self, request: ChatCompletionRequest) -> RouteDecision: ...

    def chat_body(self, expert: ExpertConfig, request: ChatCompletionRequest, messages: Sequence[ChatMessage],
                  **overrides: Any) -> dict[str, Any]: ...

    async def chat_answer(self, expert: ExpertConfig, request: ChatCompletionRequest,
                          messages: Sequence[ChatMessage], **overrides: Any) -> Answer: ...

    async def complete(self, expert: ExpertConfig, path: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, expert: ExpertConfig, path: str, body: dict[str, Any], include_usage: bool
               ) -> AsyncIterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, usage: dict[str, Any] | None) -> "Usage":
        usage = usage or {}
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def render(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

SYNTHESIS_PROMPT = (
    "You have been given the answers of several assistants to the user's latest message. Your task is to "
    "synthesise them into one answer of high quality. Critically evaluate them, because some of what they say "
    "may be wrong, biased or incomplete. Do not copy them: write one refined, accurate and complete answer of "
    "your own, well structured and in the user's language, and do not mention the assistants or these "
    "instructions."
)


# ---------------------------------------------------------------- agreement between answers


def similarity(texts: Sequence[str]) -> np.ndarray:
    """Pairwise TF-IDF cosine similarity of the texts. A text that has no terms matches nothing."""
    try:
        vectors = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    except ValueError:  # not one term in any text
        return np.eye(len(texts))
    return cosine_similarity(vectors)


def agreement(texts: Sequence[str]) -> float:
    """The mean pairwise similarity of the answers: 1.0 when they say the same, or when there is only one."""
    if len(texts) < 2:
        return 1.0
    upper = np.triu_indices(len(texts), k=1)
    return float(similarity(texts)[upper].mean())


def medoid(texts: Sequence[str]) -> int:
    """The index of the text with the highest mean similarity to the others. Ties go to the first."""
    if len(texts) < 2:
        return 0
    matrix = similarity(texts)
    np.fill_diagonal(matrix, 0.0)
    return int(np.argmax(matrix.sum(axis=1)))


def call_key(calls: Sequence[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """What makes two candidates' tool calls the same: the functions and their arguments as canonical JSON."""
    key = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        try:
            arguments = json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
        except ValueError:
            pass
        key.append((function.get("name") or "", arguments))
    return tuple(key)


def tool_vote(answers: Sequence["Candidate"]) -> tuple["Candidate", int] | None:
    """The candidate whose tool calls most candidates proposed, and how many did; ties go to the earlier candidate
    (the router's ranking). None when no candidate called a tool."""
    callers = [c for c in answers if c.tool_calls]
    if not callers:
        return None
    keys = [call_key(c.tool_calls) for c in callers]
    counts = {key: keys.count(key) for key in keys}
    winner = max(range(len(callers)), key=lambda i: (counts[keys[i]], -i))
    return callers[winner], counts[keys[winner]]


# ---------------------------------------------------------------- the stages' results


@dataclass(frozen=True)
class Plan:
    """Who answers a request: the candidates asked in parallel, and who writes the final answer.

    If `candidates` is empty, `synthesizer` answers alone and `note` says why. If `synthesizer` is None, the
    best-ranked candidate that answers writes the synthesis. That candidate is known only after the fan-out.
    """

    candidates: tuple[ExpertConfig, ...]
    synthesizer: ExpertConfig | None
    note: str | None = None

    @property
    def asked(self) -> tuple[ExpertConfig, ...]:
        return self.candidates or ((self.synthesizer,) if self.synthesizer else ())


@dataclass(frozen=True)
class Candidate:
    """One expert's answer from the fan-out, or the reason there is none."""

    expert: str
    latency_s: float
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = Usage()
    error: str | None = None
    timed_out: bool = False
    tool_calls: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    def render(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.expert, "ok": self.ok, "latency_s": round(self.latency_s, 3),
                                  "completion_tokens": self.usage.completion_tokens}
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass(frozen=True)
class FanOut:
    """Every candidate's outcome in plan order, and the wall time of the parallel phase."""

    candidates: tuple[Candidate, ...]
    seconds: float

    @property
    def answers(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.ok)

    @property
    def usage(self) -> Usage:
        return sum((c.usage for c in self.answers), Usage())


def _reason(error: BaseException) -> str:
    """What a client may read about a failure: an APIError's own message, else its kind and first line."""
    if isinstance(error, APIError):
        return error.message
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}".rstrip(": ")


def synthesis_messages(messages: Sequence[ChatMessage], answers: Sequence[Candidate]) -> tuple[ChatMessage, ...]:
    """The conversation with the candidate answers in a system message.

    The instructions go into the client's leading system message if there is one, so that chat templates
    that allow only one system turn still work.
    """
    listed = "\n\n".join(f"Answer {i}:\n{c.text.strip()}" for i, c in enumerate(answers, 1))
    brief = f"{SYNTHESIS_PROMPT}\n\n{listed}"
    first = messages[0]
    if first.role in ("system", "developer"):
        return (first.model_copy(update={"role": "system", "content": f"{first.text}\n\n{brief}"}), *messages[1:])
    return (ChatMessage(role="system", content=brief), *messages)


# ---------------------------------------------------------------- the service


class ConsensusService:
    """The chat handler of the consensus server. Everything else on 8084 is the ordinary service."""

    def __init__(self, service: ExpertCalls):
        self.service = service

    def chat(self, request: ChatCompletionRequest) -> Job | ConsensusJob:
        if request.model is not None:
            return self.service.chat(request)
        return ConsensusJob(self.service, request, self.plan(request))

    def plan(self, request: ChatCompletionRequest) -> Plan:
        """The router's ranking, narrowed to the experts that can read the input and cut to k."""
        config = self.service.config
        able = [e for e in map(config.expert, self.service.route_chat(request).ranking())
                if e is not None and (e.vision or not request.has_images) and (e.calls_tools or not request.calls_tools)]
        if not able:
            raise invalid("messages", "no expert can read images (every model is text-only); send the text alone",
                          "images_not_supported")
        k = config.consensus.experts_per_request
        chosen = able[:k]
        if len(chosen) < 2:
            if request.has_images and len(able) == 1:
                why = "only it can read images"
            elif k < 2:
                why = f"consensus.experts_per_request is {k}"
            else:
                why = "it is the only expert"
            return Plan((), chosen[0], f"answered by '{chosen[0].id}' alone, without consensus: {why}")
        aggregator = config.expert(config.consensus.aggregator) if config.consensus.aggregator else None
        if aggregator is not None and request.has_images and not aggregator.vision:
            aggregator = None
        return Plan(tuple(chosen), aggregator)


class ConsensusJob:
    """One consensus request. It renders like `Job`, plus a `consensus` object that says how the answer came about."""

    def __init__(self, service: ExpertCalls, request: ChatCompletionRequest, plan: Plan):
        self.service = service
        self.settings = service.config.consensus
        self.request = request
        self.plan = plan
        self.synthesizer = (plan.synthesizer or plan.candidates[0]).id
        self.streaming = request.stream
        self.tool_agreement: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"X-Capibara-Expert": self.synthesizer,
                   "X-Capibara-Consensus-Experts": ",".join(e.id for e in self.plan.asked)}
        if self.tool_agreement is not None:
            headers["X-Capibara-Tool-Agreement"] = self.tool_agreement
        return headers

    def _voted(self, fan_out: FanOut) -> tuple[Candidate, dict[str, Any]] | None:
        """With tools, the call most candidates agree on, never paraphrased into prose; None without one."""
        vote = tool_vote(fan_out.answers) if self.request.calls_tools and fan_out.candidates else None
        if vote is None:
            return None
        winner, agreeing = vote
        voters = len(fan_out.answers)
        self.synthesizer, self.tool_agreement = winner.expert, f"{agreeing}/{voters}"
        self.service.stats.record_tool_vote(agreeing, voters)
        consensus = self._conclude(fan_out, self.service.config.expert(winner.expert), "tool_vote", Usage(), 0.0,
                                   self.plan.note)
        consensus["tool_agreement"] = {"agreeing": agreeing, "candidates": voters}
        return winner, consensus

    async def complete(self) -> dict[str, Any]:
        fan_out = await self._fan_out()
        if (voted := self._voted(fan_out)) is not None:
            winner, consensus = voted
            answer = render_chat_response(winner.expert, None, self.request.tool_call_finish_reason,
                                          fan_out.usage.render(), consensus=consensus)
            answer["choices"][0]["message"]["tool_calls"] = list(winner.tool_calls)
            return answer
        expert = self._writer(fan_out)
        started = time.monotonic()
        method, note = ("synthesis" if fan_out.answers else "single"), self.plan.note
        try:
            answer = await self._final_answer(expert, fan_out)
            final_usage = Usage.of(answer.get("usage"))
        except Exception as error:  # noqa: BLE001 - any aggregator failure falls back to the medoid
            if not fan_out.answers:
                raise
            chosen, note = self._fallback(fan_out, expert, error)
            method, final_usage = "medoid", Usage()
            expert = self.service.config.expert(chosen.expert)
            answer = render_chat_response(expert.id, chosen.text, chosen.finish_reason, {})
        consensus = self._conclude(fan_out, expert, method, final_usage, time.monotonic() - started, note)
        return {**answer, "model": expert.id, "usage": (fan_out.usage + final_usage).render(),
                "consensus": consensus}

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        """Candidates first, then the synthesis as it is written. The `consensus` object is in the last chunk.

        One chunk is held back until the next one arrives. So if the aggregator fails before anything has reached
        the client, the medoid candidate still answers. A failure after that ends the stream with an error event.
        """
        fan_out = await self._fan_out()
        chunk_id = new_id("chat")
        if (voted := self._voted(fan_out)) is not None:
            async for chunk in self._tool_chunks(chunk_id, fan_out, *voted):
                yield chunk
            return
        expert = self._writer(fan_out)
        started = time.monotonic()
        method, note = ("synthesis" if fan_out.answers else "single"), self.plan.note
        held: dict[str, Any] | None = None
        sent = False
        final_usage = Usage()
        try:
            async with aclosing(self._final_chunks(expert, fan_out)) as chunks:
                async for chunk in chunks:
                    if chunk.get("usage") and not chunk.get("choices"):
                        final_usage = Usage.of(chunk["usage"])
                        continue
                    chunk.pop("usage", None)
                    if held is not None:
                        sent = True
                        yield held
                    held = chunk
        except Exception as error:  # noqa: BLE001 - any aggregator failure falls back to the medoid
            if sent or not fan_out.answers:
                raise
            chosen, note = self._fallback(fan_out, expert, error)
            method, final_usage = "medoid", Usage()
            expert = self.service.config.expert(chosen.expert)
            held = render_chat_chunk(chunk_id, expert.id, chosen.text, chosen.finish_reason, role=True)
        consensus = self._conclude(fan_out, expert, method, final_usage, time.monotonic() - started, note)
        last = held if held is not None else render_chat_chunk(chunk_id, expert.id, "", "stop", role=True)
        if self.request.include_usage:
            yield last
            yield {**last, "choices": [], "usage": (fan_out.usage + final_usage).render(), "consensus": consensus}
        else:
            yield {**last, "consensus": consensus}

    async def _tool_chunks(self, chunk_id: str, fan_out: FanOut, winner: Candidate, consensus: dict[str, Any]
                           ) -> AsyncIterator[dict[str, Any]]:
        """The voted calls in OpenAI's delta shape: each call's index, id and name first, then its arguments."""
        yield render_chat_chunk(chunk_id, winner.expert, None, None, role=True)
        for index, call in enumerate(winner.tool_calls):
            function = call.get("function") or {}
            head = {"index": index, "id": call.get("id"), "type": "function",
                    "function": {"name": function.get("name"), "arguments": ""}}
            for delta in (head, {"index": index, "function": {"arguments": function.get("arguments") or ""}}):
                chunk = render_chat_chunk(chunk_id, winner.expert, None, None)
                chunk["choices"][0]["delta"]["tool_calls"] = [delta]
                yield chunk
        last = render_chat_chunk(chunk_id, winner.expert, None, self.request.tool_call_finish_reason)
        if self.request.include_usage:
            yield last
            yield {**last, "choices": [], "usage": fan_out.usage.render(), "consensus": consensus}
        else:
            yield {**last, "consensus": consensus}

    # ------------------------------------------------------------ stages

    async def _fan_out(self) -> FanOut:
        """Ask every candidate at once and fail (retryably) if fewer than min_successful answer."""
        started = time.monotonic()
        candidates = await asyncio.gather(*(self._ask(e) for e in self.plan.candidates))
        fan_out = FanOut(tuple(candidates), time.monotonic() - started)
        if self.plan.candidates and len(fan_out.answers) < self.settings.min_successful:
            self.service.stats.record_consensus(len(fan_out.answers), fan_out.seconds, None,
                                                [c.expert for c in candidates if not c.ok])
            failures = "; ".join(f"{c.expert}: {c.error}" for c in candidates if not c.ok)
            message = (f"consensus needs {self.settings.min_successful} answer(s) but {len(fan_out.answers)} of "
                       f"{len(candidates)} experts answered ({failures}); retry the request")
            if all(c.timed_out for c in candidates if not c.ok):
                raise APIError(504, message, type="timeout_error", code="consensus_timeout", retry_after=1.0)
            raise unavailable(message, code="consensus_failed")
        return fan_out

    async def _ask(self, expert: ExpertConfig) -> Candidate:
        """One candidate, capped at candidate_max_tokens and candidate_timeout_s, at the candidates' (lower)
        priority. Any failure becomes a record. Every token limit the client sent is capped, max_completion_tokens
        too (vLLM reads it before max_tokens)."""
        timeout = self.settings.candidate_timeout_s
        request = self.request
        cap = self.settings.candidate_max_tokens
        limits = {name: min(value, cap) for name in ("max_tokens", "max_completion_tokens", "min_tokens")
                  if (value := getattr(request, name)) is not None}
        if "max_tokens" not in limits and "max_completion_tokens" not in limits:
            limits["max_tokens"] = min(expert.sampling.max_tokens, cap)
        overrides = {"n": 1, "stream": False, **limits,
                     "priority": tiered_priority(self.service.config.server.priorities["candidate"], request.priority)}
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(self.service.chat_answer(expert, request, request.messages, **overrides),
                                            timeout)
        except TimeoutError:
            error, timed_out = f"no answer within {timeout:g} s", True
        except Exception as failure:  # noqa: BLE001 - a failed candidate is dropped and reported, never fatal
            error, timed_out = _reason(failure), isinstance(failure, APIError) and failure.status == 504
        else:
            return Candidate(expert.id, time.monotonic() - started, answer.text, answer.finish_reason,
                             Usage.of(answer.usage), tool_calls=answer.tool_calls)
        log.warning("consensus candidate %s failed: %s", expert.id, error)
        return Candidate(expert.id, time.monotonic() - started, error=error, timed_out=timed_out)

    def _writer(self, fan_out: FanOut) -> ExpertConfig:
        """Who writes the answer: the planned synthesiser, else the best-ranked candidate that answered."""
        if self.plan.synthesizer is not None:
            return self.plan.synthesizer
        answered = {c.expert for c in fan_out.answers}
        return next(e for e in self.plan.candidates if e.id in answered)

    def _final_body(self, expert: ExpertConfig, fan_out: FanOut, stream: bool) -> dict[str, Any]:
        messages = synthesis_messages(self.request.messages, fan_out.answers) if fan_out.answers \
            else self.request.messages
        body = self.service.chat_body(expert, self.request, messages, stream=stream)
        body.pop("stream_options", None)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _final_answer(self, expert: ExpertConfig, fan_out: FanOut) -> dict[str, Any]:
        """The final answer whole. A synthesis must finish within candidate_timeout_s, so that a hung aggregator
        falls back to the medoid instead of holding the request until the expert's own request timeout."""
        call = self.service.complete(expert, CHAT_PATH, self._final_body(expert, fan_out, stream=False))
        if not fan_out.answers:
            return await call
        try:
            return await asyncio.wait_for(call, self.settings.candidate_timeout_s)
        except TimeoutError:
            raise APIError(504, f"expert '{expert.id}' did not answer within {self.settings.candidate_timeout_s:g} s",
                           type="timeout_error", code="timeout", retry_after=1.0) from None

    async def _final_chunks(self, expert: ExpertConfig, fan_out: FanOut) -> AsyncIterator[dict[str, Any]]:
        """The final answer as the runner writes it. A synthesis must start within candidate_timeout_s."""
        deadline = self.settings.candidate_timeout_s if fan_out.answers else None
        body = self._final_body(expert, fan_out, stream=True)
        async with aclosing(self.service.stream(expert, CHAT_PATH, body, include_usage=True)) as chunks:
            try:
                async with asyncio.timeout(deadline):
                    first = await anext(chunks, None)
            except TimeoutError:
                raise APIError(504, f"expert '{expert.id}' did not start its answer within {deadline:g} s",
                               type="timeout_error", code="timeout", retry_after=1.0) from None
            if first is None:
                return
            yield first
            async for chunk in chunks:
                yield chunk

    def _fallback(self, fan_out: FanOut, aggregator: ExpertConfig, error: BaseException) -> tuple[Candidate, str]:
        """The medoid candidate, and a note that says why it answers instead of the aggregator."""
        chosen = fan_out.answers[medoid([c.text for c in fan_out.answers])]
        log.warning("consensus aggregator %s failed (%s); answering with %s", aggregator.id, _reason(error),
                    chosen.expert)
        return chosen, (f"the aggregator '{aggregator.id}' failed ({_reason(error)}); the answer is the candidate "
                        f"of '{chosen.expert}', which agrees most with the others")

    def _conclude(self, fan_out: FanOut, writer: ExpertConfig, method: str, final_usage: Usage, final_s: float,
                  note: str | None) -> dict[str, Any]:
        """The `consensus` object once the answer is known. It is also recorded in /stats."""
        self.synthesizer = writer.id
        single = not fan_out.candidates
        experts = (Candidate(writer.id, final_s, usage=final_usage),) if single else fan_out.candidates
        self.service.stats.record_consensus(len(fan_out.answers) or 1, final_s if single else fan_out.seconds,
                                            None if single else final_s,
                                            [c.expert for c in fan_out.candidates if not c.ok])
        consensus: dict[str, Any] = {
            "experts": [c.render() for c in experts],
            "synthesizer": writer.id,
            "method": method,
            "agreement": round(agreement([c.text for c in fan_out.answers]), 4),
            "fanout_s": None if single else round(fan_out.seconds, 3),
            "synthesis_s": None if single else round(final_s, 3),
        }
        if note is not None:
            consensus["note"] = note
        return consensus
