"""Fitting the domain classifier with scikit-learn: the two TF-IDF vectorizers, `LinearSVC`, and
`CalibratedClassifierCV(method="temperature")`.

Deterministic (fixed folds, a fixed seed, the texts in order), so one corpus gives one model. Only training imports
this module (`python -m core.router.train`, cross-validation, a front whose stored model is missing).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from core.router.classifier import DomainClassifier, Head, Model, char_terms, word_terms
from core.router.embedding import StaticEmbedding

CHAR_MIN_DF = 2  # a character n-gram seen once is noise
SVM_C = 1.0  # chosen by 5-fold cross-validation on the training corpus (0.5, 1, 2, 4 within half a point)
CALIBRATION_FOLDS = 3  # temperature scaling fits one number: three folds of decision values are plenty
HEAD_C = 3.0  # the embedding head's regularisation, by grouped cross-validation (3 and 10 within 0.1 point)


@dataclass(frozen=True)
class Fitted:
    """sklearn's fitted objects, kept to check the plain-array scoring against them."""

    vectorizers: tuple[TfidfVectorizer, TfidfVectorizer]
    estimator: CalibratedClassifierCV
    head_estimator: LogisticRegression | None  # over sentence embeddings, when a table is given

    def predict_proba(self, text: str) -> np.ndarray:
        """sklearn's own probabilities for one text."""
        features = scipy.sparse.hstack([v.transform([text]) for v in self.vectorizers], format="csr")
        return self.estimator.predict_proba(features)[0]

    def model(self) -> Model:
        words, chars = self.vectorizers
        calibrated = self.estimator.calibrated_classifiers_[0]
        return Model(
            classes=tuple(str(c) for c in self.estimator.classes_),
            words=tuple(words.get_feature_names_out().tolist()),
            chars=tuple(chars.get_feature_names_out().tolist()),
            idf=np.concatenate((words.idf_, chars.idf_)),
            weights=np.ascontiguousarray(calibrated.estimator.coef_.T),
            intercept=calibrated.estimator.intercept_.copy(),
            beta=float(calibrated.calibrators[0].beta_),
        )


    def head(self) -> Head | None:
        """The embedding head, one column per class in `classes` order (two classes: both logits of the one)."""
        if self.head_estimator is None:
            return None
        weights, intercept = self.head_estimator.coef_.T, self.head_estimator.intercept_
        if weights.shape[1] == 1:
            weights, intercept = np.hstack((-weights, weights)) / 2, np.concatenate((-intercept, intercept)) / 2
        return Head(np.ascontiguousarray(weights), intercept.copy())


def fit(texts: Sequence[str], domains: Sequence[str], embedding: StaticEmbedding | None = None) -> Fitted:
    """The TF-IDF classifier, and with an embedding table a head over the texts' embeddings."""
    vectorizers = (TfidfVectorizer(analyzer=word_terms, sublinear_tf=True),
                   TfidfVectorizer(analyzer=char_terms, min_df=CHAR_MIN_DF, sublinear_tf=True))
    features = scipy.sparse.hstack([v.fit_transform(texts) for v in vectorizers], format="csr")
    estimator = CalibratedClassifierCV(LinearSVC(C=SVM_C, random_state=0), method="temperature",
                                       cv=StratifiedKFold(CALIBRATION_FOLDS), ensemble=False)
    estimator.fit(features, list(domains))
    head = None
    if embedding is not None:
        head = LogisticRegression(C=HEAD_C, max_iter=3000)
        head.fit(np.array([embedding.vector(text) for text in texts]), list(domains))
    return Fitted(vectorizers, estimator, head)


def train(texts: Sequence[str], domains: Sequence[str],
          embedding: StaticEmbedding | None = None) -> tuple[DomainClassifier, Head | None]:
    """The classifier (and embedding head) for these labelled texts."""
    fitted = fit(texts, domains, embedding)
    return DomainClassifier(fitted.model()), fitted.head()
