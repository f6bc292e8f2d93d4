"""The language a request is written in, by lingua's statistical language models.

Restricted to the 23 languages of the multilingual expert (Aya Expanse) and built once per process, preloaded, in
lingua's low-accuracy mode: its trigram models load in 0.2 s, take 50 MB and answer in about 0.1 ms on a short
text, where the high-accuracy 1-5-gram models take 3.4 s, 550 MB in each of the three fronts, and 0.5 ms a call.
Trigrams alone take short English technical text for Dutch or German ("zfs vs btrfs"), so the router calls a text
foreign only when the classifier agrees (see `core.router.policy`). A text in a language outside the set comes out
as its nearest neighbour in the set, which still sends it to the multilingual expert.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from lingua import IsoCode639_1, Language, LanguageDetector, LanguageDetectorBuilder

LANGUAGES = ("ar", "cs", "de", "el", "en", "es", "fa", "fr", "he", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt",
             "ro", "ru", "tr", "uk", "vi", "zh")  # Aya Expanse's 23
MAX_CHARS = 48  # enough to tell a language (half the prompts are shorter); the cost grows with the length


@dataclass(frozen=True)
class Guess:
    """The most likely language (ISO 639-1) and lingua's confidence that the text is English."""

    language: str
    english: float


ENGLISH = Guess("en", 1.0)


@functools.cache
def _detector() -> LanguageDetector:
    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in LANGUAGES]
    return (LanguageDetectorBuilder.from_languages(*languages)
            .with_low_accuracy_mode().with_preloaded_language_models().build())


def preload() -> None:
    """Build the detector now rather than on the first request."""
    _detector()


def guess(text: str) -> Guess:
    """The language of a text's prose; a text without letters is English (nothing says otherwise)."""
    # lingua reads UTF-8: a lone surrogate (a Python str may hold one, JSON bodies cannot) becomes "?"
    head = text[:MAX_CHARS].encode("utf-8", "replace").decode("utf-8")
    if not any(map(str.isalpha, head)):
        return ENGLISH
    confidences = _detector().compute_language_confidence_values(head)
    if not confidences:
        return ENGLISH
    english = next((c.value for c in confidences if c.language == Language.ENGLISH), 0.0)
    return Guess(confidences[0].language.iso_code_639_1.name.lower(), english)
