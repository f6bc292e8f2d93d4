"""The labelled prompts the classifier learns from, and the held-out ones it is measured on.

`corpus/train.jsonl` and `corpus/heldout.jsonl` hold one prompt a line: ``{"text", "domain", "lang"}``, where
domain is an expert domain (general, technical, coding, multimodal, multilingual) and lang the ISO 639-1 code of
the language it is written in. The held-out file was written separately, on other topics, and is never trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TRAIN = CORPUS_DIR / "train.jsonl"
HELDOUT = CORPUS_DIR / "heldout.jsonl"


@dataclass(frozen=True)
class Example:
    text: str
    domain: str
    lang: str


def load(path: Path) -> tuple[Example, ...]:
    """Every example of a corpus file, in file order (training is deterministic)."""
    with path.open(encoding="utf-8") as lines:
        return tuple(Example(**json.loads(line)) for line in lines if line.strip())
