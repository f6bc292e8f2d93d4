"""A streaming chat load as a client sees it: request bodies, and one SSE stream's status, events and timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp

EXPERT = "qwen_coder"
PROMPTS = ("Write a Python function that checks whether a string is a palindrome.",
           "Explain what a hash map is in two sentences.",
           "How do I read a file line by line in Rust?",
           "Write a SQL query that counts orders per customer.")


@dataclass
class StreamResult:
    """One streaming request as the client saw it: status, the raw `data:` payloads, and timings."""

    status: int
    events: list[bytes] = field(default_factory=list)
    latency_s: float = 0.0
    ttft_s: float | None = None
    disconnected: bool = False

    @property
    def complete(self) -> bool:
        """A 200 whose stream ended with [DONE] and carried no error event."""
        return (self.status == 200 and bool(self.events) and self.events[-1] == b"[DONE]"
                and not any(e.startswith(b'{"error"') for e in self.events))

    @property
    def failure(self) -> str | None:
        """Why this request counts as an error: 'http 429', 'error event', 'cut short'; None if it did not fail."""
        if self.status == 0:
            return "connection error"
        if self.status != 200:
            return f"http {self.status}"
        if any(e.startswith(b'{"error"') for e in self.events):
            return "error event"
        return None if self.complete or self.disconnected else "cut short"


def chat_body(index: int, max_tokens: int, model: str = EXPERT) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict,
                      disconnect_after: int | None = None) -> StreamResult:
    """POST a streaming chat request and read its SSE events; drop the connection after `disconnect_after` events."""
    started = time.monotonic()
    result = StreamResult(0)
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            result.status = response.status
            if response.status != 200:
                await response.read()
                return result
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if result.ttft_s is None:
                    result.ttft_s = time.monotonic() - started
                result.events.append(line[6:].rstrip(b"\r\n"))
                if disconnect_after is not None and len(result.events) >= disconnect_after:
                    response.close()  # the client leaves: the connection is closed under the stream
                    result.disconnected = True
                    break
    except aiohttp.ClientError:
        pass  # no status: a connection error; a status of 200: the stream was cut short
    result.latency_s = time.monotonic() - started
    return result
