"""How well the router generalises: the independent evaluation sets, and cross-validation grouped by paraphrase.

The independent sets (`tests/router_independent*.jsonl`) were written after the corpus, each in another voice (terse
and chatty, long and one-word, multi-turn, mixed languages, system prompts, questions without their domain's keywords)
and are never trained on: they are read only here, by the bench and the tests. Each line holds a conversation, the
turn carrying an image (or null), the best domain and the acceptable ones. Cross-validation on the corpus puts
near-paraphrases in one group, so that one prompt's rewordings never sit on both sides of a split and the score is
not a memory test.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedGroupKFold

from core.protocol import ChatMessage, ImagePart, ImageURL, TextPart
from core.router.dataset import Example

INDEPENDENT = Path(__file__).resolve().parents[2] / "tests" / "router_independent.jsonl"
# a second set, written later in yet another voice (long and chatty, one-word, system prompts, code-switching)
INDEPENDENT_2 = INDEPENDENT.with_name("router_independent_2.jsonl")
# a third, written blind (its writer never saw the corpus, the other sets or the router): dictated, misspelt,
# ticket-style and agent-workflow prompts
INDEPENDENT_3 = INDEPENDENT.with_name("router_independent_3.jsonl")
INDEPENDENT_SETS = (INDEPENDENT, INDEPENDENT_2, INDEPENDENT_3)
PARAPHRASE = 0.4  # word TF-IDF cosine from which two prompts count as one reworded (the corpus keeps no template ids)
FOLDS = 5
_IMAGE = ImagePart(type="image_url", image_url=ImageURL(url="https://example.com/photo.png"))


@dataclass(frozen=True)
class Case:
    """A labelled conversation: the domain that should answer and those that would do."""

    messages: tuple[ChatMessage, ...]
    best: str
    acceptable: frozenset[str]
    lang: str
    image: bool


def load_independent(path: Path = INDEPENDENT) -> tuple[Case, ...]:
    """The independent set as conversations, the image (a placeholder URL) on the turn that carries it."""

    def case(row: dict) -> Case:
        messages = tuple(ChatMessage(role=m["role"], content=[TextPart(type="text", text=m["content"]), _IMAGE]
                                     if i == row["image_turn"] else m["content"])
                         for i, m in enumerate(row["messages"]))
        return Case(messages, row["best"], frozenset(row["acceptable"]), row["lang"], row["image_turn"] is not None)

    with path.open(encoding="utf-8") as lines:
        return tuple(case(json.loads(line)) for line in lines if line.strip())


def as_case(example: Example) -> Case:
    """A corpus prompt as a one-turn case whose only acceptable domain is its label."""
    return Case((ChatMessage(role="user", content=example.text),), example.domain, frozenset((example.domain,)),
                example.lang, False)


@dataclass(frozen=True)
class Score:
    """Top-1 and within-acceptable hits, images routed to the multimodal domain, and the misses."""

    total: int
    top1: int
    acceptable: int
    images: tuple[int, int]  # (sent to multimodal, with an image)
    misses: tuple[tuple[Case, str, str], ...]  # (case, domain routed to, the decision's reason)

    def line(self) -> str:
        images = f", images {self.images[0]}/{self.images[1]}" if self.images[1] else ""
        return (f"top-1 {self.top1}/{self.total} = {self.top1 / self.total:.1%}, within acceptable "
                f"{self.acceptable}/{self.total} = {self.acceptable / self.total:.1%}{images}")


def score(route: Callable[[Sequence[ChatMessage]], tuple[str, str]], cases: Sequence[Case]) -> Score:
    """Run every case through `route`, which returns (domain, reason)."""
    top1 = acceptable = images = with_images = 0
    misses = []
    for case in cases:
        domain, reason = route(case.messages)
        top1 += domain == case.best
        acceptable += domain in case.acceptable
        with_images += case.image
        images += case.image and domain == "multimodal"
        if domain != case.best:
            misses.append((case, domain, reason))
    return Score(len(cases), top1, acceptable, (images, with_images), tuple(misses))


def paraphrase_groups(texts: Sequence[str]) -> np.ndarray:
    """A group id per text: connected components of the pairs whose word TF-IDF cosine is at least PARAPHRASE."""
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(texts)
    similar = (vectors @ vectors.T).tocoo()
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, cosine in zip(similar.row, similar.col, similar.data):
        if i < j and cosine >= PARAPHRASE:
            parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(texts))])


def grouped_folds(examples: Sequence[Example], folds: int = FOLDS) -> list[tuple[list[int], list[int]]]:
    """(train, test) indices, stratified by domain, each paraphrase group on one side only; fixed, so runs agree."""
    groups = paraphrase_groups([e.text for e in examples])
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=0)
    return [(list(a), list(b)) for a, b in splitter.split(np.zeros(len(examples)), [e.domain for e in examples],
                                                          groups)]


def group_sizes(examples: Sequence[Example]) -> Counter[int]:
    """How many groups have each size (for the report)."""
    return Counter(Counter(paraphrase_groups([e.text for e in examples]).tolist()).values())
