"""The routing policy: which expert answers a request that names no model, and why.

Structural signals come first, because they are surer than word statistics: an image needs the vision expert; a turn
written in another language goes to the multilingual expert, unless it is mostly code; a code block, a stack trace
or a turn that is mostly code goes to the coder. Everything else is the classifier's call. Its class probabilities
are every decision's scores and order consensus's candidates, so an expert whose domain does not fit the text (the
slow multimodal one, mostly) is asked only when a consensus needs more experts than fit.

The classifier has two stages: TF-IDF decides alone when it is sure (at least GATE); otherwise its probabilities are
averaged with the sentence-embedding stage's, which carries prompts whose domain words it has never seen. Every
decision says which stage decided ("rules", "tfidf" or "tfidf+embedding") and with what confidence.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.config import AppConfig, ExpertConfig
from core.protocol import ChatMessage
from core.router import dataset, embedding, language
from core.router.classifier import DomainClassifier, Scores
from core.router.code import CODE_SHARE, code_evidence
from core.router.embedding import EmbeddingClassifier, softmax
from core.router.turns import context, deciding_text, deciding_turn

# A turn is foreign when lingua's confidence in English is under ENGLISH_FLOOR and the classifier gives the
# multilingual domain at least AGREEMENT (both chosen on the training corpus). On short prompts (<= 60 characters)
# lingua's trigrams alone take 220 of the corpus's 3,466 English ones for another language ("zfs vs btrfs":
# German); with the classifier agreeing, 1 of the 285 held-out ones, and all 71 held-out foreign ones still count.
ENGLISH_FLOOR = 0.1
AGREEMENT = 0.2
FIT = 0.05  # below this probability an expert does not fit the text: consensus asks it only to make up numbers
# TF-IDF's top probability from which the embedding stage is not asked; the two stages' probabilities are averaged
# with equal weights. Chosen by grouped cross-validation on the corpus (0.6-1.0 and weights 0.4-0.6 within 0.3 point).
GATE = 0.9
RULES, TFIDF, BOTH = "rules", "tfidf", "tfidf+embedding"


@dataclass(frozen=True)
class RouteDecision:
    """Which expert answers, every expert's probability (highest first), and why."""

    expert: str
    scores: dict[str, float]  # the classifier's probability for each expert
    reason: str
    confidence: float  # 1.0 when a structural rule decided, else the chosen expert's probability
    elapsed_ms: float
    experts: tuple[str, ...]  # every expert, in config order
    stage: str = TFIDF  # RULES, TFIDF or BOTH: what decided (and, for the rules, what the scores came from)

    def ranking(self) -> tuple[str, ...]:
        """Expert ids best first, for consensus: the chosen expert, the others that fit the text by probability,
        then those that do not in config order (how they rank among themselves by probability is noise)."""
        fitting = [e for e, p in self.scores.items() if p >= FIT and e != self.expert]
        rest = (e for e in self.experts if e != self.expert and e not in fitting)
        return (self.expert, *fitting, *rest)


Profile = tuple[tuple[str, tuple[str, ...]], ...]  # each expert's (domain, examples and keywords), in config order


def expert_profile(experts: Sequence[ExpertConfig]) -> Profile:
    """What the classifier learns from the experts' config: their domains, example prompts and keywords."""
    return tuple((e.domain.lower(), (*e.routing.examples, *e.routing.keywords)) for e in experts)


class _OneDomain:
    """Stands in for the classifier when every expert shares one domain: nothing to tell apart."""

    def __init__(self, domain: str) -> None:
        self.classes = (domain,)

    def scores(self, text: str) -> Scores:
        return Scores(np.zeros(1), len(text.split()))

    def probabilities(self, values: np.ndarray) -> np.ndarray:
        return np.ones(1)


@dataclass(frozen=True)
class Stages:
    """The two classifiers, trained on the same texts (the embedding stage is None when there is one domain)."""

    tfidf: DomainClassifier | _OneDomain
    embedding: EmbeddingClassifier | None


def train(profile: Profile, corpus: Sequence[dataset.Example]) -> Stages:
    """Both stages, trained on the corpus prompts of the experts' domains plus the experts' own examples and
    keywords (which widen the vocabulary: +1.3 points of cross-validated accuracy on English prompts)."""
    domains = {domain for domain, _ in profile}
    if len(domains) == 1:
        return Stages(_OneDomain(domains.pop()), None)
    examples = [e for e in corpus if e.domain in domains]
    texts = [e.text for e in examples] + [text for _, own in profile for text in own]
    labels = [e.domain for e in examples] + [domain for domain, own in profile for _ in own]
    return Stages(DomainClassifier(texts, labels), EmbeddingClassifier(texts, labels))


@functools.lru_cache(maxsize=8)
def _stages(profile: Profile) -> Stages:
    """Trained on the corpus in the package, cached per profile, since a process builds several routers over the
    same experts (one per front, and many in the tests)."""
    return train(profile, dataset.load(dataset.TRAIN))


def _first(experts: Sequence[ExpertConfig], test: Callable[[ExpertConfig], bool]) -> str | None:
    return next((e.id for e in experts if test(e)), None)


class Router:
    """Trained once from the corpus and the experts' profiles; `route` only reads, so any thread may call it."""

    def __init__(self, experts: Sequence[ExpertConfig], default_expert: str, threshold: float,
                 corpus: Sequence[dataset.Example] | None = None) -> None:
        """`corpus` replaces the packaged training corpus (cross-validation trains on part of it)."""
        if not experts:
            raise ValueError("the router needs at least one expert")
        self.experts: tuple[str, ...] = tuple(e.id for e in experts)
        if default_expert not in self.experts:
            raise ValueError(f"default expert {default_expert!r} is not one of {self.experts}")
        self.default_expert = default_expert
        self.threshold = threshold
        # Images go to a model that reads them, else to the multimodal domain, whose text-only stand-in
        # (the embedded default) then answers with a clear 400 instead of a wrong expert guessing.
        self.vision_expert = (_first(experts, lambda e: e.vision)
                              or _first(experts, lambda e: e.domain.lower() == "multimodal"))
        self.multilingual_expert = _first(experts, lambda e: e.multilingual)
        self.coding_expert = _first(experts, lambda e: e.domain.lower() in ("coding", "code", "programming"))
        domains = [e.domain.lower() for e in experts]
        profile = expert_profile(experts)
        stages = _stages(profile) if corpus is None else train(profile, corpus)
        self._classifier, self._embedding = stages.tfidf, stages.embedding
        classes = self._classifier.classes
        assert self._embedding is None or self._embedding.classes == classes
        # Each expert's share of its domain's probability (experts that share a domain split it).
        self._columns = np.array([classes.index(d) if d in classes else -1 for d in domains])
        self._shares = np.array([(d in classes) / domains.count(d) for d in domains])
        multilingual = domains[self.experts.index(self.multilingual_expert)] if self.multilingual_expert else None
        self._multilingual_class = classes.index(multilingual) if multilingual in classes else None
        language.preload()
        embedding.preload()

    @classmethod
    def from_config(cls, config: AppConfig) -> "Router":
        return cls(config.experts, config.default_expert, config.router.threshold)

    def route_prompt(self, prompt: str) -> RouteDecision:
        """Route a bare completion prompt as if it were one user turn."""
        return self.route((ChatMessage(role="user", content=prompt),))

    def route(self, messages: Sequence[ChatMessage]) -> RouteDecision:
        """The expert for a conversation: any image, else the last user turn's structure, else the classifier."""
        started = time.perf_counter()
        last = deciding_turn(messages)
        text = deciding_text(messages, last)
        turns = [turn for turn in ((1.0, text) if text.strip() else None, context(messages, last)) if turn]
        scored = [(weight, self._classifier.scores(turn)) for weight, turn in turns]
        probabilities, stage = self._probabilities(turns, scored)
        scores = self._scores(probabilities)
        expert, reason, confidence, rule = self._decide(messages, text, scored, scores)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return RouteDecision(expert, scores, reason, confidence, elapsed_ms, self.experts, RULES if rule else stage)

    def _decide(self, messages: Sequence[ChatMessage], text: str, scored: list[tuple[float, Scores]],
                scores: dict[str, float]) -> tuple[str, str, float, bool]:
        """Structural rules in order of certainty (the last item says a rule decided), then the classifier's best
        expert or the default."""
        if self.vision_expert and any(m.has_images for m in messages):
            return self.vision_expert, "image content", 1.0, True
        code = code_evidence(text)
        if self.multilingual_expert and text.strip() and (foreign := self._foreign(code.prose, scored[0][1])):
            if self.coding_expert and code.share >= CODE_SHARE:
                return self.coding_expert, f"mostly code, non-English text ({foreign})", 1.0, True
            return self.multilingual_expert, f"non-English text ({foreign})", 1.0, True
        if code.structural and self.coding_expert:
            return self.coding_expert, code.structural, 1.0, True
        if not any(s.known_words for _, s in scored):
            return self.default_expert, "no known words: default expert", scores[self.default_expert], False
        best, probability = next(iter(scores.items()))
        if probability < self.threshold:
            return self.default_expert, "below threshold: default expert", scores[self.default_expert], False
        return best, "classifier", probability, False

    def _foreign(self, prose: str, deciding: Scores) -> str | None:
        """The language of a turn written in anything but English, by lingua with the classifier agreeing (asked
        first: it is cheaper, and it settles most English turns)."""
        if self._multilingual_class is not None:  # (a classifier that never saw the domain cannot agree)
            if self._classifier.probabilities(deciding.values)[self._multilingual_class] < AGREEMENT:
                return None
        guess = language.guess(prose)
        return None if guess.language == "en" or guess.english >= ENGLISH_FLOOR else guess.language

    def _probabilities(self, turns: list[tuple[float, str]],
                       scored: list[tuple[float, Scores]]) -> tuple[np.ndarray, str]:
        """Class probabilities of the turns' weighted mean, by TF-IDF alone when it is sure, else averaged with the
        embedding stage's; and which stage that was.

        The deciding turn alone speaks for the multilingual class: a conversation that moves from Spanish to English
        is English from then on, and its Spanish turns only lend their topic.
        """
        if not scored:
            return self._classifier.probabilities(self._classifier.scores("").values), TFIDF
        weights = np.array([weight for weight, _ in scored]) / sum(weight for weight, _ in scored)
        values = self._mean(weights, [s.values for _, s in scored])
        tfidf = self._classifier.probabilities(values)
        if self._embedding is None or tfidf.max() >= GATE:
            return tfidf, TFIDF
        logits = self._mean(weights, [self._embedding.logits(text) for _, text in turns])
        return (tfidf + softmax(logits)) / 2.0, BOTH

    def _mean(self, weights: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
        """Weighted mean of per-turn values, the multilingual class taken from the deciding turn (the first) only."""
        mean = weights @ np.array(rows)
        if self._multilingual_class is not None and len(rows[0]) > self._multilingual_class:
            mean[self._multilingual_class] = rows[0][self._multilingual_class]
        return mean

    def _scores(self, probabilities: np.ndarray) -> dict[str, float]:
        """Every expert's probability, highest first, ties in config order."""
        # column -1 picks the appended 0: an expert whose domain the classifier never saw
        probabilities = np.append(probabilities, 0.0)[self._columns] * self._shares
        rounded = probabilities.round(6).tolist()
        order = sorted(range(len(self.experts)), key=lambda i: (-rounded[i], i))
        return {self.experts[i]: rounded[i] for i in order}
