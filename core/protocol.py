"""The OpenAI protocol for all three servers: request parsing and validation, response rendering, errors.

Parsing turns an untrusted JSON body into frozen request objects or raises `APIError` naming the bad
param; rendering turns engine results into OpenAI's response, chunk and error shapes. Nothing here
knows about experts, engines or HTTP.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import orjson

ROLES = ("system", "developer", "user", "assistant", "tool")
AUTO_MODEL = "auto"
MAX_STOP_SEQUENCES = 16
MAX_N = 16
IMAGE_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: float = 1.0, code: str = "expert_unavailable") -> APIError:
    """A retryable 503: the expert is loading, failed to load, or the server is shutting down."""
    return APIError(503, message, type="service_unavailable_error", code=code, retry_after=retry_after)


@dataclass(frozen=True)
class ImagePart:
    """An image content part, validated: a data: URL (decoded bytes kept) or an http(s) URL."""

    url: str
    media_type: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class ChatMessage:
    """One conversation turn with its text parts joined and its images kept aside."""

    role: str
    text: str
    images: tuple[ImagePart, ...] = ()


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling fields as the client sent them; None means "use the expert's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: tuple[ChatMessage, ...]
    sampling: SamplingRequest
    stream: bool = False
    include_usage: bool = False

    @property
    def has_images(self) -> bool:
        return any(message.images for message in self.messages)


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: tuple[str, ...]
    sampling: SamplingRequest
    stream: bool = False
    include_usage: bool = False


# ---------------------------------------------------------------- parsing


def decode_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object (invalid UTF-8 is invalid JSON)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise invalid(None, f"request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, "request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and value == value


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if integer and not _is_int(value):
        raise invalid(name, f"'{name}' must be an integer")
    if not integer and not _is_number(value):
        raise invalid(name, f"'{name}' must be a number")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean")
    return value


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is None or model == AUTO_MODEL:
        return None
    if not isinstance(model, str) or not model:
        raise invalid("model", "'model' must be a non-empty string")
    return model


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences")
    return tuple(stop)


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "'include_usage' must be a boolean")
    return include


def _sampling(body: dict) -> SamplingRequest:
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    n = _number(body, "n", 1, MAX_N, integer=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    top_k = _number(body, "top_k", -1, 1 << 20, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise invalid("top_p", "'top_p' must be greater than 0")
    return SamplingRequest(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=top_p,
        top_k=top_k,
        n=n or 1,
        stop=_stop(body),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 2.0),
    )


def _image(url: Any, param: str) -> ImagePart:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise invalid(param, f"{param}: image_url must carry a 'url' string", "invalid_image")
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise invalid(param, f"{param}: data URL must be 'data:image/<type>;base64,<data>'", "invalid_image")
        if media_type not in IMAGE_SIGNATURES:
            raise invalid(param, f"{param}: unsupported image type {media_type!r}; use PNG, JPEG, WebP or GIF",
                          "invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(param, f"{param}: image data is not valid base64", "invalid_image") from None
        if not data.startswith(IMAGE_SIGNATURES[media_type]) or (
                media_type == "image/webp" and data[8:12] != b"WEBP"):
            raise invalid(param, f"{param}: image data is not a valid {media_type} file", "invalid_image")
        return ImagePart(url=url, media_type=media_type, data=data)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise invalid(param, f"{param}: image URL must be http(s) or a base64 data URL", "invalid_image")
    return ImagePart(url=url)


def _message(raw: Any, index: int) -> ChatMessage:
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise invalid(param, f"{param} must be an object")
    role = raw.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role", f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}")
    content = raw.get("content")
    if content is None and role == "assistant":
        return ChatMessage(role=role, text="")
    if isinstance(content, str):
        return ChatMessage(role=role, text=content)
    if not isinstance(content, list):
        raise invalid(f"{param}.content", f"{param}.content must be a string or a list of content parts")
    texts: list[str] = []
    images: list[ImagePart] = []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            images.append(_image(part.get("image_url"), part_param))
        elif kind == "image_url":
            raise invalid(part_param, f"{part_param}: only user messages may carry images")
        else:
            raise invalid(part_param, f"{part_param} must be a text part or an image_url part")
    return ChatMessage(role=role, text="\n".join(texts), images=tuple(images))


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    if all(m.role in ("system", "developer") for m in parsed):
        raise invalid("messages", "'messages' must contain at least one user or assistant message")
    stream = _boolean(body, "stream")
    return ChatRequest(model=_model(body), messages=parsed, sampling=_sampling(body), stream=stream,
                       include_usage=_stream_options(body, stream))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise invalid("prompt", "'prompt' must be a string or a non-empty list of strings")
    if len(prompts) > MAX_N:
        raise invalid("prompt", f"'prompt' may hold at most {MAX_N} prompts")
    stream = _boolean(body, "stream")
    return CompletionRequest(model=_model(body), prompts=prompts, sampling=_sampling(body), stream=stream,
                             include_usage=_stream_options(body, stream))


# ---------------------------------------------------------------- rendering


@dataclass
class Choice:
    """One finished choice, accumulated from engine deltas."""

    index: int
    text: str = ""
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def render(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class ResponseHead:
    """What every response and chunk of one request shares."""

    kind: str  # "chat" or "text"
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, kind: str, model: str) -> "ResponseHead":
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind=kind, model=model, id=f"{prefix}-{uuid.uuid4().hex}")


def render_response(head: ResponseHead, choices: list[Choice], usage: Usage, **extra: Any) -> dict[str, Any]:
    if head.kind == "chat":
        rendered = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        obj = "chat.completion"
    else:
        rendered = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for c in choices]
        obj = "text_completion"
    response = {"id": head.id, "object": obj, "created": head.created, "model": head.model,
                "choices": rendered, "usage": usage.render()}
    response.update(extra)
    return response


def render_chunk(head: ResponseHead, index: int, text: str | None, finish_reason: str | None,
                 *, role: bool = False, **extra: Any) -> dict[str, Any]:
    """One streamed chunk for one choice; `role` marks the first delta of a chat choice."""
    if head.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    chunk = {"id": head.id, "object": obj, "created": head.created, "model": head.model, "choices": [choice]}
    chunk.update(extra)
    return chunk


def render_usage_chunk(head: ResponseHead, usage: Usage, **extra: Any) -> dict[str, Any]:
    obj = "chat.completion.chunk" if head.kind == "chat" else "text_completion"
    chunk = {"id": head.id, "object": obj, "created": head.created, "model": head.model, "choices": [],
             "usage": usage.render()}
    chunk.update(extra)
    return chunk


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
