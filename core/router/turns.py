"""Which turns of a conversation the router reads, and how much each one counts.

The last user turn decides. The turns around it only lend it context: they are read as one text (the most recent
first) that weighs half the deciding turn, so a short follow-up ("now make it faster") keeps the topic of the
conversation, and a long conversation costs two classifications, not one per turn. A first turn gets a small nudge
from the system prompt instead.
"""
from __future__ import annotations

from collections.abc import Sequence

from core.protocol import ChatMessage

MAX_DECIDING_CHARS = 512  # the deciding turn; a longer one is read by its head and tail (~90 words)
MAX_CONTEXT_CHARS = 200  # each context turn, by its head and tail
HISTORY_TURNS = 3  # the most recent turns besides the deciding one
HISTORY_WEIGHT = 0.5  # the conversation around the deciding turn, against its 1
SYSTEM_WEIGHT = 0.15  # a system prompt nudges the classifier, it never decides
SYSTEM_ROLES = ("system", "developer")


def clip(text: str, limit: int) -> str:
    """Head and tail of a long text, where a request's intent usually sits."""
    if len(text) <= limit:
        return text
    head = limit * 3 // 4
    return text[:head] + "\n" + text[len(text) - (limit - head):]


def deciding_turn(messages: Sequence[ChatMessage]) -> int:
    """The last user turn, else the last non-system turn, else the last turn (-1 when there is none)."""
    for wanted in (lambda m: m.role == "user", lambda m: m.role not in SYSTEM_ROLES, lambda m: True):
        for i in range(len(messages) - 1, -1, -1):
            if wanted(messages[i]):
                return i
    return -1


def deciding_text(messages: Sequence[ChatMessage], last: int) -> str:
    """The deciding turn's text, clipped ("" for an empty conversation)."""
    return clip(messages[last].text, MAX_DECIDING_CHARS) if messages else ""


def context(messages: Sequence[ChatMessage], last: int) -> tuple[float, str] | None:
    """The recent turns besides the deciding one as one text and its weight; with no such turns, the system
    prompts (a conversation under way says more about the topic than a system prompt does)."""
    others = [m for i, m in enumerate(messages) if i != last and m.text.strip()]
    history = [m.text for m in reversed(others) if m.role not in SYSTEM_ROLES][:HISTORY_TURNS]
    texts, weight = (history, HISTORY_WEIGHT) if history else ([m.text for m in others], SYSTEM_WEIGHT)
    return (weight, "\n".join(clip(text, MAX_CONTEXT_CHARS) for text in texts)) if texts else None
