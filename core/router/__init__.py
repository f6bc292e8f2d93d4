"""Routing for requests that name no model: structural signals first, then a TF-IDF classifier.

One concern a module: `code` (code blocks, stack traces, code share), `language` (lingua), `dataset` (the labelled
corpus in `corpus/`), `classifier` (TF-IDF word and character n-grams, a calibrated linear SVM), `evaluation` (the
independent set, grouped cross-validation), `turns` (which turns of a conversation count, and how much) and `policy`
(the rules and the decision).
"""
from core.router.policy import RouteDecision, Router

__all__ = ["RouteDecision", "Router"]
