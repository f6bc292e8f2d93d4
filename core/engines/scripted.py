"""A deterministic engine for protocol and fault tests: no model, predictable text, scriptable faults.

It answers with the words of the last user message (or the prompt) prefixed by "echo:", one word a
token, honouring max_tokens, stop strings and n. Directives in the prompt script faults:
``[[sleep=S]]`` waits S seconds before the first token, ``[[fail]]`` raises after the first token,
``[[hang]]`` never answers; the option ``test_fault`` does the same for every request of an expert.
An absolute model path that does not exist fails the load, so a test can make a load fail and then
recover by creating the file. It is never the only evidence that a feature works: see tests/.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from collections.abc import AsyncIterator

from core.config import ExpertConfig
from core.engines import Engine, EngineError, EngineInfo, GenerationDelta, GenerationRequest

_SLEEP = re.compile(r"\[\[sleep=([0-9.]+)\]\]")


class ScriptedEngine(Engine):
    def __init__(self, expert: ExpertConfig):
        self.expert = expert
        self.info = EngineInfo(kind="test", effective={"token_delay_s": expert.engine.test_token_delay_s})
        self._in_flight = 0

    @classmethod
    async def start(cls, expert: ExpertConfig) -> "ScriptedEngine":
        await asyncio.sleep(expert.engine.test_load_delay_s)
        if expert.engine.test_fail_load or (expert.model.startswith("/") and not Path(expert.model).exists()):
            raise RuntimeError(f"cannot load model from {expert.model}")
        return cls(expert)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @staticmethod
    def _source(request: GenerationRequest) -> str:
        if request.messages is None:
            return request.prompt or ""
        users = [m["content"] for m in request.messages if m["role"] == "user"]
        return users[-1] if users else ""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        source = self._source(request)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.messages or ()) \
            or len(source.split())
        words = ["echo:"] + source.split()
        settings = request.sampling
        self._in_flight += 1
        try:
            sleep = _SLEEP.search(source)
            if sleep:
                await asyncio.sleep(float(sleep.group(1)))
            fault = self.expert.engine.test_fault
            if "[[hang]]" in source or fault == "hang":
                await asyncio.Event().wait()
            text = ""
            for position, word in enumerate(words):
                if position == settings.max_tokens:
                    break
                await asyncio.sleep(self.expert.engine.test_token_delay_s)
                if position == 1 and ("[[fail]]" in source or fault == "fail"):
                    raise EngineError("scripted failure during generation")
                candidate = text + (" " if position else "") + word
                stops = [candidate.find(s) for s in settings.stop if s in candidate]
                if stops:
                    for index in range(settings.n):
                        yield GenerationDelta(index, candidate[:min(stops)][len(text):], 1, prompt_tokens, "stop")
                    return
                last = position + 1 == len(words)
                for index in range(settings.n):
                    yield GenerationDelta(index, candidate[len(text):], 1, prompt_tokens, "stop" if last else None)
                text = candidate
            else:
                return
            for index in range(settings.n):
                yield GenerationDelta(index, "", 0, prompt_tokens, "length")
        finally:
            self._in_flight -= 1

    async def shutdown(self) -> None:
        return None
