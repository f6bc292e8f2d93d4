"""The routing policy: which expert answers a request that names no model, and why.

Structural signals come first, because they are surer than word statistics: an image needs the vision expert; a turn
written in another language goes to the multilingual expert, unless it is mostly code; a code block, a stack trace
or a turn that is mostly code goes to the coder. Everything else is the classifier's call. Its class probabilities
are every decision's scores and order consensus's candidates, so an expert whose domain does not fit the text (the
slow multimodal one, mostly) is asked only when a consensus needs more experts than fit.

Every decision says what decided ("rules", "tfidf", or "tfidf+embedding" when the classifier's probabilities were
blended with a static sentence embedding's, `core.router.embedding`) and with what confidence. The embedding reads by
meaning where TF-IDF matches words; it is used when `make models` has distilled its table.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.config import AppConfig, ExpertConfig
from core.protocol import ChatMessage
from core.router import dataset, embedding, language, store
from core.router.classifier import DomainClassifier, Head, Scores
from core.router.code import CODE_SHARE, code_evidence
from core.router.embedding import StaticEmbedding
from core.router.turns import context, deciding_text, deciding_turn

log = logging.getLogger(__name__)

# A turn is foreign when lingua's confidence in English is under ENGLISH_FLOOR and the classifier gives the
# multilingual domain at least AGREEMENT (both chosen on the training corpus). On short prompts (<= 60 characters)
# lingua's trigrams alone take 220 of the corpus's 3,466 English ones for another language ("zfs vs btrfs":
# German); with the classifier agreeing, 1 of the 285 held-out ones, and all 71 held-out foreign ones still count.
ENGLISH_FLOOR = 0.1
AGREEMENT = 0.2
FIT = 0.05  # below this probability an expert does not fit the text: consensus asks it only to make up numbers
# The embedding stage is asked when TF-IDF's best probability is under EMBEDDING_BELOW; its head's log-probabilities
# then weigh EMBEDDING_WEIGHT against TF-IDF's (both chosen by grouped cross-validation on the corpus).
EMBEDDING_BELOW = 0.85
EMBEDDING_WEIGHT = 0.5
RULES, TFIDF, EMBEDDING = "rules", "tfidf", "tfidf+embedding"  # what decided: a rule, the classifier, or both stages


@dataclass(frozen=True)
class RouteDecision:
    """Which expert answers, every expert's probability (highest first), and why."""

    expert: str
    scores: dict[str, float]  # the classifier's probability for each expert
    reason: str
    confidence: float  # 1.0 when a structural rule decided, else the chosen expert's probability
    elapsed_ms: float
    experts: tuple[str, ...]  # every expert, in config order
    stage: str = TFIDF  # RULES or TFIDF: what decided

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


def training_set(profile: Profile, corpus: Sequence[dataset.Example]) -> tuple[list[str], list[str]]:
    """The texts and labels the classifier learns from: the corpus prompts of the experts' domains plus the experts'
    own examples and keywords (which widen the vocabulary: +1.3 points of cross-validated accuracy on English
    prompts)."""
    domains = {domain for domain, _ in profile}
    examples = [e for e in corpus if e.domain in domains]
    texts = [e.text for e in examples] + [text for _, own in profile for text in own]
    labels = [e.domain for e in examples] + [domain for domain, own in profile for _ in own]
    return texts, labels


@dataclass(frozen=True)
class Trained:
    """The TF-IDF classifier, and the embedding stage when the table is stored: its table and the head over it."""

    classifier: DomainClassifier | _OneDomain
    head: Head | None = None
    embedding: StaticEmbedding | None = None


@functools.cache
def _embedding() -> StaticEmbedding | None:
    """The stored embedding table, or None (with one warning) until `make models` has distilled it."""
    try:
        return embedding.load(embedding.key())
    except store.Refused as refused:
        log.warning("%s: routing without the embedding stage, with a classifier trained now (about 5 s); "
                    "`make models` (python -m core.router.train) distils the table and trains the router once", refused)
        return None


def train(profile: Profile, corpus: Sequence[dataset.Example], table: StaticEmbedding | None = None) -> Trained:
    """The classifier (and, given the embedding table, its head), trained now: cross-validation, and a front whose
    stored model is missing."""
    domains = {domain for domain, _ in profile}
    if len(domains) == 1:
        return Trained(_OneDomain(domains.pop()))
    from core.router import fit  # sklearn: imported only when training, 1.2 s of a front's start otherwise
    classifier, head = fit.train(*training_set(profile, corpus), table)
    return Trained(classifier, head, table if head is not None else None)


@functools.lru_cache(maxsize=8)
def _trained(profile: Profile) -> Trained:
    """Loaded from the store (trained by `python -m core.router.train`), else trained now with one warning; cached
    per profile, since a process builds several routers over the same experts (one per front, many in tests)."""
    corpus = dataset.load(dataset.TRAIN)
    table = _embedding() if len({domain for domain, _ in profile}) > 1 else None
    if table is not None:
        try:
            classifier, head = store.load(store.key(*training_set(profile, corpus), embedding.key()))
            return Trained(classifier, head, table) if head is not None else Trained(classifier)
        except store.Refused as refused:
            log.warning("%s: training the router now (about 6 s); after editing the corpus or the experts' routing "
                        "profiles, retrain once with `make models` or `python -m core.router.train`", refused)
    return train(profile, corpus, table)


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
        self.tool_experts = frozenset(e.id for e in experts if e.calls_tools)
        domains = [e.domain.lower() for e in experts]
        profile = expert_profile(experts)
        trained = _trained(profile) if corpus is None else train(profile, corpus, _embedding())
        self._classifier, self._head, self._embedding = trained.classifier, trained.head, trained.embedding
        classes = self._classifier.classes
        # Each expert's share of its domain's probability (experts that share a domain split it).
        self._columns = np.array([classes.index(d) if d in classes else -1 for d in domains])
        self._shares = np.array([(d in classes) / domains.count(d) for d in domains])
        multilingual = domains[self.experts.index(self.multilingual_expert)] if self.multilingual_expert else None
        self._multilingual_class = classes.index(multilingual) if multilingual in classes else None
        language.preload()

    @classmethod
    def from_config(cls, config: AppConfig) -> "Router":
        return cls(config.experts, config.default_expert, config.router.threshold)

    def route_prompt(self, prompt: str) -> RouteDecision:
        """Route a bare completion prompt as if it were one user turn."""
        return self.route((ChatMessage(role="user", content=prompt),))

    def route(self, messages: Sequence[ChatMessage], tools: bool = False) -> RouteDecision:
        """The expert for a conversation: any image, else the last user turn's structure, else the classifier;
        with `tools` (the request may call them), the best of the experts that can."""
        started = time.perf_counter()
        last = deciding_turn(messages)
        text = deciding_text(messages, last)
        turns = [turn for turn in ((1.0, text) if text.strip() else None, context(messages, last)) if turn]
        scored = [(weight, self._classifier.scores(turn)) for weight, turn in turns]
        probabilities = self._probabilities(scored)
        consulted = self._head is not None and bool(turns) and probabilities.max() < EMBEDDING_BELOW
        if consulted:
            probabilities = self._with_embedding(probabilities, turns)
        scores = self._scores(probabilities)
        expert, reason, confidence, rule = self._decide(messages, text, scored, scores)
        if tools and expert not in self.tool_experts:
            able = [e for e in scores if e in self.tool_experts]
            if able:
                reason = f"tools: {expert} ({reason}) cannot call tools; the best expert that can"
                expert, confidence, rule = able[0], scores[able[0]], True
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        stage = RULES if rule else EMBEDDING if consulted else TFIDF
        return RouteDecision(expert, scores, reason, confidence, elapsed_ms, self.experts, stage)

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

    def _probabilities(self, scored: list[tuple[float, Scores]]) -> np.ndarray:
        """Class probabilities of the weighted mean of the turns' decision values.

        The deciding turn (the first) alone speaks for the multilingual class: a conversation that moves from Spanish
        to English is English from then on, and its Spanish turns only lend their topic.
        """
        if not scored:
            return self._classifier.probabilities(self._classifier.scores("").values)
        return self._classifier.probabilities(self._turn_mean([(weight, s.values) for weight, s in scored]))

    def _turn_mean(self, rows: list[tuple[float, np.ndarray]]) -> np.ndarray:
        """The weighted mean of the turns' values, but the deciding turn's own value for the multilingual class."""
        weights = np.array([weight for weight, _ in rows])
        values = np.array([row for _, row in rows])
        mean = weights @ values / weights.sum()
        if self._multilingual_class is not None and values.shape[1] > 1:  # (two classes share one value: kept mean)
            mean[self._multilingual_class] = values[0, self._multilingual_class]
        return mean

    def _with_embedding(self, tfidf: np.ndarray, turns: list[tuple[float, str]]) -> np.ndarray:
        """TF-IDF's probabilities blended with the embedding head's, geometrically (EMBEDDING_WEIGHT): the head reads
        the turns as the classifier does. It has no say on the multilingual class, whose probability stays TF-IDF's:
        the table is English-only and takes any text about language for a language request ("the translation
        lookaside buffer"), so the head only shares out the rest among the other classes."""
        logits = self._turn_mean([(weight, self._head.values(self._embedding.vector(turn))) for weight, turn in turns])
        head = np.exp(logits - logits.max())
        own = self._multilingual_class
        if own is not None:
            head[own] = 0.0
            head *= (1.0 - tfidf[own]) / head.sum()
            head[own] = tfidf[own]
        else:
            head /= head.sum()
        blended = (1.0 - EMBEDDING_WEIGHT) * np.log(tfidf + 1e-12) + EMBEDDING_WEIGHT * np.log(head + 1e-12)
        exp = np.exp(blended - blended.max())
        return exp / exp.sum()

    def _scores(self, probabilities: np.ndarray) -> dict[str, float]:
        """Every expert's probability, highest first, ties in config order."""
        # column -1 picks the appended 0: an expert whose domain the classifier never saw
        probabilities = np.append(probabilities, 0.0)[self._columns] * self._shares
        rounded = probabilities.round(6).tolist()
        order = sorted(range(len(self.experts)), key=lambda i: (-rounded[i], i))
        return {self.experts[i]: rounded[i] for i in order}
