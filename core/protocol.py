"""The OpenAI protocol for all three servers: request parsing and validation, response rendering, errors."""
from __future__ import annotations

from dataclasses import dataclass


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
