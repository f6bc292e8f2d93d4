"""One request's id and what it used, for its `X-Request-Id`, its access log line and the runner it reaches.

The HTTP layer opens a `RequestRecord` per request; the pipeline adds the experts and tokens it used through the
context, so consensus candidates (tasks that copy the context) add to the same record.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

MAX_ID_LENGTH = 128
_CLIENT_ID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}$")  # printable ASCII, no spaces: one token in a log


@dataclass
class RequestRecord:
    id: str
    experts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, expert_id: str, usage: dict[str, Any]) -> None:
        if expert_id not in self.experts:
            self.experts.append(expert_id)
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)


_current: ContextVar[RequestRecord | None] = ContextVar("capibara_request", default=None)


def request_id(client_id: str | None) -> str:
    """The client's own id when it is printable and at most 128 characters, else a new one."""
    if client_id is not None and _CLIENT_ID.match(client_id):
        return client_id
    return uuid.uuid4().hex


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """`record` is the current request's within the block."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


def note_usage(expert_id: str, usage: dict[str, Any]) -> None:
    """Count an expert's answer (and its tokens) toward the current request, if there is one."""
    record = _current.get()
    if record is not None:
        record.add(expert_id, usage)


def runner_headers() -> dict[str, str]:
    """The current request's id for the runner it reaches (vLLM logs it with `--enable-log-requests`)."""
    record = _current.get()
    return {"X-Request-Id": record.id} if record is not None else {}
