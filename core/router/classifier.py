"""The domain classifier as plain arrays: TF-IDF over word and character n-grams, a linear SVM's weights and a
temperature, scored in a few numpy operations.

`core.router.fit` fits the model with scikit-learn; `core.router.store` saves and loads it. Scoring needs neither:
sklearn's `transform` and `predict_proba` spend about 3 ms a call validating their input, 17 times this scoring,
against a routing budget of 1 ms, and importing sklearn costs a front 1.2 s at start. The analyzers below are
sklearn's (the fit uses them too); a test checks that both give the same probabilities.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (1, 4)  # across word boundaries: spelling, morphology, any script, code, short phrases
CHAR_HEAD = 96  # character n-grams read a text's head: they serve short texts, words carry long ones
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token pattern
_WHITE_SPACES = re.compile(r"\s\s+")  # sklearn's whitespace normalisation before character n-grams


def word_terms(text: str) -> list[str]:
    """Lowercased word unigrams and bigrams, as sklearn's word analyzer with WORD_NGRAMS."""
    tokens = _TOKEN.findall(text.lower())
    low, high = WORD_NGRAMS
    terms = tokens[:] if low == 1 else []
    for n in range(max(low, 2), min(high, len(tokens)) + 1):
        terms += [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return terms


def char_terms(text: str) -> list[str]:
    """Character n-grams of the lowercased head, as sklearn's "char" analyzer with CHAR_NGRAMS."""
    head = _WHITE_SPACES.sub(" ", text[:CHAR_HEAD].lower())
    low, high = CHAR_NGRAMS
    terms = list(head) if low == 1 else []
    for n in range(max(low, 2), min(high, len(head)) + 1):
        terms += [head[i:i + n] for i in range(len(head) - n + 1)]
    return terms


@dataclass(frozen=True)
class Scores:
    """A text's SVM decision values (one per class), and how many distinct words of it the model knows."""

    values: np.ndarray
    known_words: int


@dataclass(frozen=True)
class Model:
    """Everything scoring reads: the classes, each space's terms in column order, idf, the SVM and its temperature."""

    classes: tuple[str, ...]
    words: tuple[str, ...]
    chars: tuple[str, ...]
    idf: np.ndarray  # words then chars
    weights: np.ndarray  # features x (classes, or 1 for two)
    intercept: np.ndarray
    beta: float


class _Space:
    """One vectorizer's analyzer and vocabulary, and where its columns start."""

    def __init__(self, analyze: Callable[[str], list[str]], terms: Sequence[str], offset: int) -> None:
        self.analyze = analyze
        self.vocabulary = dict(zip(terms, range(len(terms))))
        self.offset = offset

    def columns(self, text: str) -> np.ndarray:
        """The column of each of the text's terms that the vectorizer knows, repeats included."""
        ids = np.array([*map(self.vocabulary.get, self.analyze(text), repeat(-1))], dtype=np.intp)
        return ids[ids >= 0] + self.offset


class DomainClassifier:
    """A fitted model; `scores` and `probabilities` only read, so any thread may call them."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.classes = model.classes
        self._spaces = (_Space(word_terms, model.words, 0), _Space(char_terms, model.chars, len(model.words)))
        self._idf = model.idf
        self._weights = np.ascontiguousarray(model.weights)
        self._intercept = model.intercept
        self._beta = model.beta

    def scores(self, text: str) -> Scores:
        """The SVM's decision values for one text: sublinear tf times idf, unit length in each space (as sklearn's
        transform and `hstack`), times the SVM's weights."""
        words, chars = self._spaces
        ids, counts = np.unique(np.concatenate((words.columns(text), chars.columns(text))), return_counts=True)
        values = (np.log(counts) + 1.0) * self._idf[ids]
        split = int(ids.searchsorted(chars.offset))  # ids are sorted: words first
        for space in (values[:split], values[split:]):
            if len(space):
                space /= np.sqrt(space @ space)
        return Scores(values @ self._weights[ids] + self._intercept, split)

    def probabilities(self, values: np.ndarray) -> np.ndarray:
        """Class probabilities (in `classes` order) from decision values: softmax of the scaled logits."""
        logits = self._beta * (np.concatenate((-values, values)) if len(values) == 1 else values)
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()


@dataclass(frozen=True)
class Head:
    """A linear layer over sentence embeddings (`core.router.embedding`): decision values per class, like the SVM's."""

    weights: np.ndarray  # dims x classes
    intercept: np.ndarray

    def values(self, vector: np.ndarray) -> np.ndarray:
        return vector @ self.weights + self.intercept
