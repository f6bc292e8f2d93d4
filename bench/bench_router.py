"""The router: how long it takes to build, how often it is right on prompts it never saw, and how fast it decides.

Prints the start-up cost (lingua's models, loading the stored classifier, and training it), top-1 and
within-acceptable accuracy on the three independent sets (tests/router_independent*.jsonl, other voices, never trained
on) with their misses, cross-validation on the corpus grouped by paraphrase, top-1 on the held-out corpus with its
confusion matrix and per-language accuracy, how often consensus would ask the multimodal expert, lingua's accuracy
and cost on short texts, and p50/p99 decision time (wall clock and CPU) on held-out, independent, short and
2,000-char prompts and a five-turn conversation. Targets: independent top-1 >= 95 % and within acceptable >= 98 % on every set, p99 < 1 ms.

Run from the repository root: ``.venv/bin/python -m bench.bench_router``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from core.config import EMBEDDED_CONFIG, load_config
from core.protocol import ChatMessage
from core.router import Router, dataset, embedding, evaluation, fit, language, policy, store
from core.router.policy import AGREEMENT, ENGLISH_FLOOR, expert_profile, training_set

SHORT = (  # about 50 characters each, one per kind of decision
    "What is a good name for a golden retriever puppy?",
    "Write a Python function that merges two sorted lists",
    "Explain how DNS resolution works, step by step.",
    "¿Cuál es la mejor época del año para viajar a Japón?",
    "Describe the trend in the attached sales chart.",
)
LONG_SEEDS = (
    "I am planning a trip with my family and would like some advice about what to pack, where to stay and "
    "which sights the children would enjoy most. We like museums, parks and good food. ",
    "Our service keeps timing out under load. The database has a connection pool of twenty, the load balancer "
    "spreads traffic across three replicas and latency grows with throughput. Explain what could cause this. ",
    "def handler(event):\n    items = [parse(x) for x in event['records']]\n    return {'count': len(items)}\n",
    "Necesito escribir una carta formal para solicitar un puesto de trabajo en una empresa de tecnología, "
    "¿me puedes ayudar a redactarla con un tono profesional y cercano? ",
)
CONVERSATION = (  # a system prompt and two exchanges before the deciding turn
    ChatMessage(role="system", content="You are a helpful assistant. Answer clearly and concisely."),
    ChatMessage(role="user", content="I have a CSV export of our sales, about 200 MB, with one row per order."),
    ChatMessage(role="assistant", content="You can load it with pandas and aggregate by month or region."),
    ChatMessage(role="user", content="Write the code to sum revenue per region and month."),
    ChatMessage(role="assistant", content="df.groupby(['region', 'month'])['revenue'].sum() gives you that table."),
    ChatMessage(role="user", content="Now make it faster, it takes a minute."),
)
SHORT_TEXT = 60  # "short" for the language detector: at most this many characters


def _long(seed: str, length: int = 2000) -> str:
    return (seed * (length // len(seed) + 1))[:length]


def _quantiles(samples: Sequence[float]) -> tuple[float, float]:
    """(p50, p99)."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def _timed(call: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of `rounds` calls, after a warm-up."""
    for _ in range(min(rounds, 20)):
        call()
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.thread_time()
        call()
        cpu.append((time.thread_time() - c) * 1000.0)
        wall.append((time.perf_counter() - w) * 1000.0)
    return wall, cpu


def _build(config_path: str) -> tuple[Router, float, float, float]:
    """The router as a front builds it, lingua's load time, the router's (from the store, if `make models` stored
    it), and how long training it takes (seconds)."""
    started = time.perf_counter()
    language.preload()
    loaded = time.perf_counter()
    router = Router.from_config(load_config(config_path))
    built = time.perf_counter()
    policy.train(expert_profile(load_config(config_path).experts), dataset.load(dataset.TRAIN), router._embedding)
    return router, loaded - started, built - loaded, time.perf_counter() - built


def _generalisation(router: Router, config_path: str, train: Sequence[dataset.Example]) -> None:
    """The independent sets (with their misses) and cross-validation on the corpus grouped by paraphrase."""
    config = load_config(config_path)
    domain_of = {e.id: e.domain.lower() for e in config.experts}
    sets = {path.name: evaluation.load_independent(path) for path in evaluation.INDEPENDENT_SETS}
    sizes = evaluation.group_sizes(train)
    folds = evaluation.grouped_folds(train)
    routers = [Router(config.experts, config.default_expert, config.router.threshold,
                      corpus=[train[i] for i in fit]) for fit, _ in folds]

    def route(on: Router) -> Callable[[Sequence[ChatMessage]], tuple[str, str]]:
        def decide(messages: Sequence[ChatMessage]) -> tuple[str, str]:
            decision = on.route(messages)
            why = decision.reason if decision.stage == policy.RULES else f"{decision.stage} {decision.confidence:.2f}"
            return domain_of[decision.expert], why
        return decide

    for name, cases in sets.items():
        print(f"\n{name}: {len(cases)} conversations, {len({c.lang for c in cases})} language tags, "
              f"{sum(c.image for c in cases)} with an image, {sum(len(c.messages) > 1 for c in cases)} multi-turn")
    print(f"grouped {len(folds)}-fold cross-validation on the training corpus: {sum(sizes.values())} paraphrase "
          f"groups ({sum(n for size, n in sizes.items() if size > 1)} of 2-{max(sizes)} prompts)")
    found = {name: evaluation.score(route(router), cases) for name, cases in sets.items()}
    for name, score in found.items():
        print(f"  {name}: {score.line()}")
    folded = [evaluation.score(route(fitted), [evaluation.as_case(train[i]) for i in test])
              for fitted, (_, test) in zip(routers, folds)]
    right, total = sum(f.top1 for f in folded), sum(f.total for f in folded)
    print(f"  grouped CV: top-1 {right}/{total} = {right / total:.1%} "
          f"(folds {', '.join(f'{f.top1 / f.total:.1%}' for f in folded)})")
    for name, score in found.items():
        outside = sum(domain not in case.acceptable for case, domain, _ in score.misses)
        print(f"  {name} misses, {outside} outside acceptable (best -> routed to, * when acceptable, the stage that "
              f"decided and its confidence or the rule, turns, last turn):")
        for case, domain, reason in score.misses:
            ok = "*" if domain in case.acceptable else " "
            print(f"    {case.best:>12} -> {domain:<12}{ok} {reason[:24]:<24} {len(case.messages):>2} "
                  f"{case.messages[-1].text[:70]!r}")


def _accuracy(router: Router, by_domain: dict[str, str], examples: Sequence[dataset.Example]) -> None:
    domains = sorted(by_domain)
    domain_of = {expert: domain for domain, expert in by_domain.items()}
    confusion: Counter[tuple[str, str]] = Counter()
    per_language: defaultdict[str, list[bool]] = defaultdict(list)
    vision = by_domain.get("multimodal")
    asked_vision = Counter()
    for example in examples:
        decision = router.route_prompt(example.text)
        confusion[example.domain, domain_of[decision.expert]] += 1
        per_language[example.lang].append(decision.expert == by_domain[example.domain])
        fits = example.domain == "multimodal"
        asked_vision[fits, vision in decision.ranking()[:3]] += 1
    right = sum(confusion[d, d] for d in domains)
    print(f"held-out top-1: {right}/{len(examples)} = {right / len(examples):.2%}")
    print("\nconfusion matrix (rows: labelled domain, columns: routed to)")
    print(f"{'':>14}" + "".join(f"{d[:12]:>13}" for d in domains) + f"{'recall':>9}")
    for d in domains:
        row = [confusion[d, c] for c in domains]
        print(f"{d:>14}" + "".join(f"{n:>13}" for n in row) + f"{confusion[d, d] / max(1, sum(row)):>9.1%}")
    print("\nper-language accuracy (held-out)")
    for lang, hits in sorted(per_language.items(), key=lambda item: (-len(item[1]), item[0])):
        print(f"  {lang:>3}: {sum(hits):>3}/{len(hits):<3} {sum(hits) / len(hits):>7.1%}")
    if vision:
        others = asked_vision[False, True] + asked_vision[False, False]
        own = asked_vision[True, True] + asked_vision[True, False]
        print(f"\nconsensus (top 3) asks {vision}: for {asked_vision[True, True]}/{own} multimodal prompts, "
              f"for {asked_vision[False, True]}/{others} others")


def _language(router: Router, train: Sequence[dataset.Example], heldout: Sequence[dataset.Example]) -> None:
    """lingua alone on all the corpus's short prompts; the router's rule (lingua and the classifier agreeing) on the
    held-out ones, which the classifier never saw; lingua's cost per call."""

    def short(examples: Sequence[dataset.Example]) -> tuple[list[str], list[str], list[dataset.Example]]:
        """English prompts about English, foreign prompts, and foreign prompts in a language lingua knows."""
        kept = [e for e in examples if len(e.text) <= SHORT_TEXT and "```" not in e.text]
        foreign = [e for e in kept if e.lang != "en"]
        return ([e.text for e in kept if e.lang == "en" and e.domain != "multilingual"], [e.text for e in foreign],
                [e for e in foreign if e.lang in language.LANGUAGES])

    def alone(text: str) -> str:
        guess = language.guess(text)
        return "en" if guess.english >= ENGLISH_FLOOR else guess.language

    def routed(text: str) -> bool:
        return router.route_prompt(text).reason.startswith("non-English")

    english, foreign, known = short([*train, *heldout])
    print(f"\nlanguage on short texts (<= {SHORT_TEXT} chars)")
    print(f"  lingua alone (train + held-out): English taken for foreign "
          f"{sum(alone(t) != 'en' for t in english)}/{len(english)}, "
          f"foreign detected {sum(alone(t) != 'en' for t in foreign)}/{len(foreign)}, "
          f"language named {sum(alone(e.text) == e.lang for e in known)}/{len(known)} "
          f"(of those in the {len(language.LANGUAGES)} languages it knows)")
    english, foreign, _ = short(heldout)
    print(f"  the router's rule, lingua and the classifier agreeing (held-out): English taken for foreign "
          f"{sum(map(routed, english))}/{len(english)}, foreign detected {sum(map(routed, foreign))}/{len(foreign)}")
    wall, cpu = [], []
    for text in english + foreign:
        w, c = _timed(lambda: language.guess(text), 5)
        wall += w
        cpu += c
    (w50, w99), (c50, c99) = _quantiles(wall), _quantiles(cpu)
    print(f"  lingua's cost per call: p50 {w50:.3f} ms, p99 {w99:.3f} ms wall (CPU p50 {c50:.3f}, p99 {c99:.3f}); "
          f"the router calls it only when the classifier gives the multilingual domain >= {AGREEMENT}")


def _latency(router: Router, config_path: str, rounds: int, examples: Sequence[dataset.Example]) -> None:
    cases = {
        "held-out (mix)": [(ChatMessage(role="user", content=e.text),) for e in examples],
        "independent (mix)": [c.messages for path in evaluation.INDEPENDENT_SETS
                              for c in evaluation.load_independent(path)],
        "short (~50 chars)": [(ChatMessage(role="user", content=text),) for text in SHORT],
        "long (2,000 chars)": [(ChatMessage(role="user", content=_long(seed)),) for seed in LONG_SEEDS],
        "5-turn chat": [CONVERSATION],
    }
    print(f"\ndecision time (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    print(f"{'prompts':<20} {'decisions':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU p50':>8} {'CPU p99':>8}")
    for name, prompts in cases.items():
        wall, cpu = [], []
        per_prompt = max(1, rounds // len(prompts))
        for messages in prompts:
            w, c = _timed(lambda: router.route(messages), per_prompt)
            wall += w
            cpu += c
        (w50, w99), (c50, c99) = _quantiles(wall), _quantiles(cpu)
        print(f"{name:<20} {len(wall):>10} {w50:>8.3f} {w99:>8.3f} {c50:>8.3f} {c99:>8.3f}")
    by_stage: defaultdict[str, list[float]] = defaultdict(list)
    for messages in [*cases["held-out (mix)"], *cases["independent (mix)"]]:
        stage = router.route(messages).stage
        by_stage[stage] += _timed(lambda: router.route(messages), 10)[0]
    print("by the stage that decided (held-out and independent prompts, 10 timings each):")
    for stage, wall in sorted(by_stage.items()):
        p50, p99 = _quantiles(wall)
        print(f"  {stage:<16} {len(wall) // 10:>5} prompts  p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    classifier = router._classifier
    config = load_config(config_path)
    fitted = fit.fit(*training_set(expert_profile(config.experts), dataset.load(dataset.TRAIN)))
    wall, _ = _timed(lambda: [classifier.probabilities(classifier.scores(text).values) for text in SHORT], 200)
    ours = statistics.median(wall) / len(SHORT)
    wall, _ = _timed(lambda: [fitted.predict_proba(text) for text in SHORT], 40)
    theirs = statistics.median(wall) / len(SHORT)
    print(f"baseline: sklearn's transform + predict_proba take {theirs:.3f} ms a short prompt, the router's "
          f"scoring of the same model {ours:.3f} ms ({theirs / ours:.0f}x less)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(EMBEDDED_CONFIG))
    parser.add_argument("--rounds", type=int, default=6000, help="decisions timed per row")
    args = parser.parse_args()

    router, lingua_s, router_s, training_s = _build(args.config)
    config = load_config(args.config)
    train, heldout = dataset.load(dataset.TRAIN), dataset.load(dataset.HELDOUT)
    own = sum(len(e.routing.examples) + len(e.routing.keywords) for e in config.experts)
    stored = store.path(store.key(*training_set(expert_profile(config.experts), train), embedding.key()))
    print(f"start-up: lingua's models {lingua_s:.2f} s, the router {router_s:.3f} s "
          f"({'loaded from ' + stored.name if stored.is_file() else 'trained: no stored model, run make models'}, "
          f"embedding stage {'on' if router._head is not None else 'off'}); "
          f"training it takes {training_s:.2f} s ({len(train)} corpus prompts + {own} config examples and keywords)")
    by_domain = {e.domain.lower(): e.id for e in config.experts}
    _generalisation(router, args.config, train)
    _accuracy(router, by_domain, heldout)
    _language(router, train, heldout)
    _latency(router, args.config, args.rounds, heldout)


if __name__ == "__main__":
    main()
