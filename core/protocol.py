"""The OpenAI protocol for all three servers: pydantic request models, errors, and the few shapes we render.

A request body is validated into `ChatCompletionRequest` or `CompletionRequest`; anything neither we nor the
runners support is a 400 naming the field, never silently dropped. What passes validation is relayed to the
expert's runner, which renders tool calls, logprobs and structured output itself. Nothing here knows about
experts, engines or HTTP.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import orjson
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

AUTO_MODEL = "auto"
MAX_STOP_SEQUENCES = 16
MAX_N = 16
MAX_TOKENS = 1 << 20  # the bound of token limits when the caller names none (a server passes server.max_tokens)
MAX_PRIORITY = 1000  # a client's priority, within its port's tier: -1000 (first) .. 1000
PRIORITY_TIER_SPAN = 2 * MAX_PRIORITY + 1
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


# ---------------------------------------------------------------- request models


class _Model(BaseModel):
    # strict: JSON types as they are ("stream": "yes" is an error, not true); integers still pass as floats.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _valid_image(cls, url: str) -> str:
        check_image_url(url)
        return url


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant"):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role != "user" and isinstance(self.content, list) and any(
                isinstance(part, ImagePart) for part in self.content):
            raise ValueError("only user messages may carry images")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(part, ImagePart) for part in self.content)


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class JSONSchema(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


Stop = Annotated[str, Field(min_length=1)]


def _capped(tokens: int | None, info: ValidationInfo) -> int | None:
    """A token limit within the server's cap (the `max_tokens` of the validation context)."""
    cap = (info.context or {}).get("max_tokens", MAX_TOKENS)
    if tokens is not None and tokens > cap:
        raise ValueError(f"at most {cap} tokens on this server (server.max_tokens)")
    return tokens


class _Generation(_Model):
    """The fields both endpoints share: ours, OpenAI's, and the vLLM sampling extras benchmark clients send."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | list[Stop] | None = Field(None)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    priority: int | None = Field(None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    # Ours: keep the engine's own fields (vLLM's token_ids, prompt_logprobs, kv_transfer_params, ...) in the
    # response; by default a response has OpenAI's fields only.
    engine_fields: bool = False

    @field_validator("max_tokens", "min_tokens")
    @classmethod
    def _within_the_token_cap(cls, tokens: int | None, info: ValidationInfo) -> int | None:
        return _capped(tokens, info)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stop

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str | None) -> str | None:
        if model is not None and not model:
            raise ValueError("must be a non-empty string")
        return None if model == AUTO_MODEL else model

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _completion_tokens_within_the_cap(cls, tokens: int | None, info: ValidationInfo) -> int | None:
        return _capped(tokens, info)

    @field_validator("messages")
    @classmethod
    def _someone_speaks(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if all(m.role in ("system", "developer") for m in messages):
            raise ValueError("must contain at least one user or assistant message")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top_logprobs

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            names = {tool.function.name for tool in info.data.get("tools") or ()}
            if not names:
                raise ValueError("needs tools")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"names the function '{choice.function.name}', which is not in tools")
        return choice

    @property
    def calls_tools(self) -> bool:
        """The answer may be a tool call: tools are given and tool_choice is not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_call_finish_reason(self) -> str:
        """OpenAI's finish reason for an answer that is a tool call: "stop" when tool_choice named the function."""
        return "stop" if isinstance(self.tool_choice, NamedToolChoice) else "tool_calls"

    @property
    def has_images(self) -> bool:
        return any(message.has_images for message in self.messages)


class CompletionRequest(_Generation):
    prompt: Annotated[str, Field(min_length=0)] | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def tiered_priority(tier: int, client: int | None) -> int:
    """The priority a runner and the host's queue get: the port's tier (server.priorities) first, the client's own
    priority only within it, so no client outranks a more urgent port."""
    return tier * PRIORITY_TIER_SPAN + max(-MAX_PRIORITY, min(MAX_PRIORITY, client or 0))


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


def parse_chat_request(body: dict[str, Any], max_tokens: int = MAX_TOKENS) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body, max_tokens)


def parse_completion_request(body: dict[str, Any], max_tokens: int = MAX_TOKENS) -> CompletionRequest:
    return _parse(CompletionRequest, body, max_tokens)


def _parse(model: type[_Generation], body: dict[str, Any], max_tokens: int):
    """The request validated, its token limits held to `max_tokens`."""
    try:
        return model.model_validate(body, context={"max_tokens": max_tokens})
    except ValidationError as error:
        raise _as_api_error(error) from None


def _as_api_error(error: ValidationError) -> APIError:
    """The first problem, named as OpenAI names params (`messages[0].content`)."""
    item = _most_specific(error.errors())
    param = _param(item["loc"])
    if item["type"] == "extra_forbidden":
        return invalid(param, f"Unsupported parameter: '{param}' is not supported by this server",
                       "unsupported_parameter")
    if item["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'", "missing_required_parameter")
    message = item["msg"].removeprefix("Value error, ")
    return invalid(param, f"Invalid value for '{param}': {message}" if param else message,
                   "invalid_image" if param and param.endswith("image_url.url") else "invalid_value")


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a union's alternatives, the error that went deepest names the real problem."""
    return max(errors, key=lambda e: (e["type"] in ("extra_forbidden", "missing"), len(e["loc"])))


def _param(loc: tuple) -> str | None:
    """pydantic's location without its union-member labels: ('messages', 0, 'content') -> messages[0].content."""
    parts: list[str] = []
    after_index = False
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
            after_index = True
            continue
        name = str(part)
        label = not name.isidentifier() or name[0].isupper() or name in ("str", "int", "float", "bool")
        if not label and not (after_index and name in _PART_TAGS):
            parts.append(name)
        after_index = False
    return ".".join(parts) or None


_PART_TAGS = ("text", "image_url")  # a content part's discriminator, reported before its fields


def check_image_url(url: str) -> None:
    """A base64 data URL of a real PNG/JPEG/GIF/WebP, or an http(s) URL; raises ValueError saying which it is not."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise ValueError("image data URL must be 'data:image/<type>;base64,<data>'")
        if media_type not in IMAGE_SIGNATURES:
            raise ValueError(f"unsupported image type {media_type!r}; use PNG, JPEG, WebP or GIF")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image data is not valid base64") from None
        if not data.startswith(IMAGE_SIGNATURES[media_type]) or (
                media_type == "image/webp" and data[8:12] != b"WEBP"):
            raise ValueError(f"image data is not a valid {media_type} file")
        return
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("image URL must be http(s) or a base64 data URL")


# ---------------------------------------------------------------- rendering


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def render_chat_response(model: str, text: str | None, finish_reason: str | None, usage: dict[str, int],
                         **extra: Any) -> dict[str, Any]:
    """A chat completion we write ourselves (consensus's medoid answer); relayed answers keep the runner's."""
    return {"id": new_id("chat"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": usage, **extra}


def render_chat_chunk(chunk_id: str, model: str, text: str | None, finish_reason: str | None, *, role: bool = False,
                      **extra: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


# OpenAI's response fields, level by level; `consensus` is our own documented extension on 8084.
_RESPONSE = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier",
             "consensus", "error"}
_CHOICE = {"index", "message", "delta", "text", "logprobs", "finish_reason"}
_MESSAGE = {"role", "content", "refusal", "tool_calls", "function_call", "annotations", "audio"}
_TOOL_CALL = {"index", "id", "type", "function"}
_USAGE = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details"}


def openai_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """A response or chunk with only the fields OpenAI's schema has: the OpenAI client and agents parse these, and
    the engine's own (token ids, routed experts, KV transfer parameters) are internals."""
    out = {k: v for k, v in payload.items() if k in _RESPONSE}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k in _USAGE}
    if isinstance(out.get("choices"), list):
        out["choices"] = [_openai_choice(c) if isinstance(c, dict) else c for c in out["choices"]]
    return out


def _openai_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in choice.items() if k in _CHOICE}
    for key in ("message", "delta"):
        if isinstance(out.get(key), dict):
            message = {k: v for k, v in out[key].items() if k in _MESSAGE}
            if isinstance(message.get("tool_calls"), list):
                message["tool_calls"] = [{k: v for k, v in call.items() if k in _TOOL_CALL}
                                         if isinstance(call, dict) else call for call in message["tool_calls"]]
            out[key] = message
    return out


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
