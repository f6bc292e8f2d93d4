"""A small OpenAI-shaped upstream for protocol and fault tests: no model, predictable text, scriptable faults.

It answers with the words of the last user message (or the prompt) prefixed by "echo:", one word a token,
honouring max_tokens, stop strings, n and stream_options.include_usage. Directives in the text script faults:
``[[sleep=S]]`` waits S seconds before the first token, ``[[fail]]`` sends an error event after the first
token (a 500 when not streaming), ``[[cut]]`` drops the connection after the first token, ``[[hang]]`` never
answers, ``[[status=N]]`` answers HTTP N with an OpenAI error, ``[[delay=S]]`` waits S seconds before each
token. Directives in the model's name apply to every request for it (serve ``echo[[hang]]`` for an expert that
always hangs). ``GET /_requests`` lists the bodies it received,
so tests can check what a front forwarded. Run it as ``python -m tests.fake_upstream --port P``; it is never the
only evidence that a feature works.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

_SLEEP = re.compile(r"\[\[sleep=([0-9.]+)\]\]")
_DELAY = re.compile(r"\[\[delay=([0-9.]+)\]\]")
_STATUS = re.compile(r"\[\[status=([0-9]{3})\]\]")


class FakeUpstream:
    def __init__(self, models: list[str], token_delay_s: float, api_key: str | None, models_delay_s: float):
        self.models = models
        self.token_delay_s = token_delay_s
        self.api_key = api_key
        self.models_delay_s = models_delay_s
        self.requests: list[dict[str, Any]] = []
        self.open_streams = 0

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if self.api_key and request.path.startswith("/v1/") and \
                request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "bad key")
        return await handler(request)

    async def list_models(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.models_delay_s)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def requests_seen(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "open_streams": self.open_streams})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "body": body, "request_id": request.headers.get("X-Request-Id")})
        if body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        source = _source(body, chat)
        directives = f"{body['model']} {source}"
        status = _STATUS.search(directives)
        if status:
            return _error(int(status.group(1)), f"scripted status {status.group(1)}")
        sleep = _SLEEP.search(directives)
        if sleep:
            await asyncio.sleep(float(sleep.group(1)))
        delay = _DELAY.search(directives)
        token_delay_s = float(delay.group(1)) if delay else self.token_delay_s
        if "[[hang]]" in directives:
            await asyncio.Event().wait()
        words = ["echo:", *source.split()]
        n, max_tokens = int(body.get("n") or 1), int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        prompt_tokens = len(source.split()) + (sum(len(str(m.get("content", "")).split()) for m in body["messages"]
                                                   if m["role"] == "system") if chat else 0)
        pieces, finish = _pieces(words, max_tokens, stops)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) * n,
                 "total_tokens": prompt_tokens + len(pieces) * n}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body["model"]}
        if not body.get("stream"):
            await asyncio.sleep(token_delay_s * len(pieces))
            if "[[fail]]" in directives:
                return _error(500, "scripted failure")
            text = "".join(pieces)
            choices = [({"index": i, "message": {"role": "assistant", "content": text}} if chat
                        else {"index": i, "text": text}) | {"logprobs": None, "finish_reason": finish}
                       for i in range(n)]
            return web.json_response({**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": choices, "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.open_streams += 1
        try:
            obj = "chat.completion.chunk" if chat else "text_completion"
            for position, piece in enumerate(pieces):
                await asyncio.sleep(token_delay_s)
                if position == 1 and "[[fail]]" in directives:
                    await _send(response, {"error": {"message": "scripted failure", "type": "server_error",
                                                     "code": 500}})
                    await response.write(b"data: [DONE]\n\n")
                    return response
                if position == 1 and "[[cut]]" in directives:
                    request.transport.close()
                    return response
                last = position + 1 == len(pieces)
                for i in range(n):
                    delta = {"content": piece} | ({"role": "assistant"} if position == 0 else {})
                    choice = ({"index": i, "delta": delta} if chat else {"index": i, "text": piece}) | {
                        "logprobs": None, "finish_reason": finish if last else None}
                    await _send(response, {**head, "object": obj, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await _send(response, {**head, "object": obj, "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.open_streams -= 1
        return response

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.auth])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/_requests", self.requests_seen)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        return app


def _source(body: dict[str, Any], chat: bool) -> str:
    if not chat:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else " ".join(prompt or [])
    users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
    content = users[-1] if users else ""
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def _pieces(words: list[str], max_tokens: int, stops: list[str]) -> tuple[list[str], str]:
    """The answer's tokens (a word each, spaced) and its finish reason."""
    pieces: list[str] = []
    text = ""
    for position, word in enumerate(words):
        if position == max_tokens:
            return pieces, "length"
        piece = (" " if position else "") + word
        candidate = text + piece
        hits = [candidate.find(s) for s in stops if s in candidate]
        if hits:
            cut = candidate[:min(hits)][len(text):]
            if cut:
                pieces.append(cut)
            return pieces, "stop"
        pieces.append(piece)
        text = candidate
    return pieces, "stop"


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                        else "server_error", "param": None, "code": status}}, status=status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="echo", help="comma-separated model names it serves")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--models-delay", type=float, default=0.0, help="seconds before /v1/models answers")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    upstream = FakeUpstream(args.models.split(","), args.token_delay, args.api_key, args.models_delay)
    web.run_app(upstream.application(), host="127.0.0.1", port=args.port, access_log=None, print=None,
                handler_cancellation=True, shutdown_timeout=1)


if __name__ == "__main__":
    main()
