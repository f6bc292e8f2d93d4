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
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from core.router.classifier import DomainClassifier, Model, char_terms, word_terms

CHAR_MIN_DF = 2  # a character n-gram seen once is noise
SVM_C = 1.0  # chosen by 5-fold cross-validation on the training corpus (0.5, 1, 2, 4 within half a point)
CALIBRATION_FOLDS = 3  # temperature scaling fits one number: three folds of decision values are plenty


@dataclass(frozen=True)
class Fitted:
    """sklearn's fitted objects, kept to check the plain-array scoring against them."""

    vectorizers: tuple[TfidfVectorizer, TfidfVectorizer]
    estimator: CalibratedClassifierCV

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


def fit(texts: Sequence[str], domains: Sequence[str]) -> Fitted:
    vectorizers = (TfidfVectorizer(analyzer=word_terms, sublinear_tf=True),
                   TfidfVectorizer(analyzer=char_terms, min_df=CHAR_MIN_DF, sublinear_tf=True))
    features = scipy.sparse.hstack([v.fit_transform(texts) for v in vectorizers], format="csr")
    estimator = CalibratedClassifierCV(LinearSVC(C=SVM_C, random_state=0), method="temperature",
                                       cv=StratifiedKFold(CALIBRATION_FOLDS), ensemble=False)
    estimator.fit(features, list(domains))
    return Fitted(vectorizers, estimator)


def train(texts: Sequence[str], domains: Sequence[str]) -> DomainClassifier:
    """The classifier for these labelled texts."""
    return DomainClassifier(fit(texts, domains).model())
