"""The domain classifier: TF-IDF over word and character n-grams, a linear SVM, temperature-scaled probabilities.

scikit-learn fits everything (the two vectorizers, `LinearSVC`, `CalibratedClassifierCV(method="temperature")`),
deterministically: fixed folds, a fixed seed, the corpus in file order. A request is then scored with the fitted
analyzers, vocabularies, idf and weights in a few numpy operations, because sklearn's `transform` and
`predict_proba` spend about 3 ms a call on this box validating their input, 17 times this scoring, against a routing
budget of 1 ms. A test checks that both give the same probabilities.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import scipy.sparse
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (1, 4)  # across word boundaries: spelling, morphology, any script, code, short phrases
CHAR_MIN_DF = 2  # a character n-gram seen once is noise
CHAR_HEAD = 96  # character n-grams read a text's head: they serve short texts, words carry long ones
SVM_C = 1.0  # chosen by 5-fold cross-validation on the training corpus (0.5, 1, 2, 4 within half a point)
CALIBRATION_FOLDS = 3  # temperature scaling fits one number: three folds of decision values are plenty


def char_text(text: str) -> str:
    """What the character n-grams read (sklearn's preprocessor for them, so fitting and scoring agree)."""
    return text[:CHAR_HEAD].lower()


@dataclass(frozen=True)
class Scores:
    """A text's SVM decision values (one per class), and how many distinct words of it the model knows."""

    values: np.ndarray
    known_words: int


class _Space:
    """One fitted vectorizer as plain data: its analyzer and vocabulary, and where its columns start."""

    def __init__(self, vectorizer: TfidfVectorizer, offset: int) -> None:
        self.analyze: Callable[[str], list[str]] = vectorizer.build_analyzer()
        self.vocabulary: dict[str, int] = vectorizer.vocabulary_
        self.offset = offset

    def columns(self, text: str) -> np.ndarray:
        """The column of each of the text's terms that the vectorizer knows, repeats included."""
        ids = np.array([*map(self.vocabulary.get, self.analyze(text), repeat(-1))], dtype=np.intp)
        return ids[ids >= 0] + self.offset


class DomainClassifier:
    """Fitted once from labelled texts; `scores` and `probabilities` only read, so any thread may call them."""

    def __init__(self, texts: Sequence[str], domains: Sequence[str]) -> None:
        self.vectorizers = (
            TfidfVectorizer(ngram_range=WORD_NGRAMS, sublinear_tf=True),
            TfidfVectorizer(analyzer="char", ngram_range=CHAR_NGRAMS, min_df=CHAR_MIN_DF, sublinear_tf=True,
                            preprocessor=char_text),
        )
        features = scipy.sparse.hstack([v.fit_transform(texts) for v in self.vectorizers], format="csr")
        self.model = CalibratedClassifierCV(LinearSVC(C=SVM_C, random_state=0), method="temperature",
                                            cv=StratifiedKFold(CALIBRATION_FOLDS), ensemble=False)
        self.model.fit(features, list(domains))
        self.classes: tuple[str, ...] = tuple(self.model.classes_)
        calibrated = self.model.calibrated_classifiers_[0]
        self._weights = np.ascontiguousarray(calibrated.estimator.coef_.T)  # features x (classes, or 1 for two)
        self._intercept = calibrated.estimator.intercept_
        self._beta = float(calibrated.calibrators[0].beta_)
        words, chars = self.vectorizers
        self._spaces = (_Space(words, 0), _Space(chars, len(words.vocabulary_)))
        self._idf = np.concatenate((words.idf_, chars.idf_))

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
