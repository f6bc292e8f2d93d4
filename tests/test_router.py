"""The semantic router: labelled prompts, each structural rule on its own, and the numpy TF-IDF path.

The labelled prompts (tests/router_cases.json) name a domain, not an expert id, so they hold for any
config whose experts cover the five domains.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, AppConfig, load_config
from core.protocol import ChatMessage, ImagePart
from core.router import (
    _MAX_CHAR_NGRAM_CHARS,
    Router,
    _code_evidence,
    _fit_vectorizers,
    _profile_documents,
    _sentences,
    detect_language,
    is_translation_request,
)

CASES = json.loads((Path(__file__).parent / "router_cases.json").read_text())
IMAGE = ImagePart(url="https://example.com/photo.png")


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return load_config(EMBEDDED_CONFIG)


@pytest.fixture(scope="module")
def router(config: AppConfig) -> Router:
    return Router.from_config(config)


@pytest.fixture(scope="module")
def by_domain(config: AppConfig) -> dict[str, str]:
    return {expert.domain: expert.id for expert in config.experts}


def user(text: str, *images: ImagePart) -> ChatMessage:
    return ChatMessage(role="user", text=text, images=images)


def case_messages(case: dict) -> list[ChatMessage]:
    """A labelled case as a conversation: optional system prompt and history, then the prompt."""
    messages = [ChatMessage(role="system", text=case["system"])] if case.get("system") else []
    history = case.get("history", [])
    if case.get("image_in_history") and not history:
        history = [["user", "Here is a photo of my bike."], ["assistant", "It is a red road bike."]]
    for i, (role, text) in enumerate(history):
        images = (IMAGE,) if case.get("image_in_history") and i == 0 else ()
        messages.append(ChatMessage(role=role, text=text, images=images))
    messages.append(user(case["prompt"], *((IMAGE,) if case.get("image") else ())))
    return messages


# --- the labelled prompts ----------------------------------------------------------------------


def test_the_labelled_set_is_broad_enough() -> None:
    assert len(CASES) >= 100
    assert set(Counter(c["domain"] for c in CASES)) == {"general", "technical", "coding", "multimodal", "multilingual"}
    assert len({c["lang"] for c in CASES}) >= 10
    assert sum(bool(c.get("image") or c.get("image_in_history")) for c in CASES) >= 10


def test_accuracy_on_the_labelled_prompts(router: Router, by_domain: dict[str, str]) -> None:
    misses = []
    per_domain: Counter[str] = Counter()
    for case in CASES:
        decision = router.route(case_messages(case))
        if decision.expert != by_domain[case["domain"]]:
            misses.append((case["domain"], decision.expert, decision.reason, case["prompt"][:60]))
            per_domain[case["domain"]] += 1
    accuracy = 1 - len(misses) / len(CASES)
    assert accuracy >= 0.93, f"accuracy {accuracy:.3f}; misses: {misses}"
    for domain, total in Counter(c["domain"] for c in CASES).items():
        assert per_domain[domain] / total <= 0.12, f"{domain}: {per_domain[domain]} of {total} missed: {misses}"


# --- structural rules, one at a time -----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "What is in this picture?", "def f(x): return x", "¿Qué ves aquí?"])
def test_any_image_goes_to_the_vision_expert(router: Router, by_domain: dict[str, str], text: str) -> None:
    decision = router.route([user(text, IMAGE)])
    assert (decision.expert, decision.reason, decision.confidence) == (by_domain["multimodal"], "image content", 1.0)


def test_an_image_earlier_in_the_conversation_still_needs_vision(router: Router, by_domain: dict[str, str]) -> None:
    messages = [user("Look at this.", IMAGE), ChatMessage("assistant", "A cat on a sofa."), user("What colour is it?")]
    assert router.route(messages).expert == by_domain["multimodal"]


def test_without_a_vision_model_an_image_goes_to_the_multimodal_domain(config: AppConfig) -> None:
    """The embedded default's multimodal expert cannot read images: it gets them anyway and answers a clear 400."""
    blind = [e.model_copy(update={"vision": False}) for e in config.experts]
    decision = Router(blind, config.default_expert, config.router.threshold).route(
        [user("Write a Python function that sorts a list.", IMAGE)])
    assert decision.reason == "image content"
    assert decision.expert == next(e.id for e in blind if e.domain == "multimodal")


def test_without_any_image_expert_an_image_request_falls_through(config: AppConfig) -> None:
    others = [e.model_copy(update={"vision": False}) for e in config.experts if e.domain != "multimodal"]
    decision = Router(others, config.default_expert, config.router.threshold).route(
        [user("Write a Python function that sorts a list.", IMAGE)])
    assert decision.reason != "image content"
    assert decision.expert == next(e.id for e in others if e.domain == "coding")


@pytest.mark.parametrize("text, reason", [
    ("Why does this fail?\n```python\nprint(undefined_name)\n```", "code block"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\nNameError: name 'x' is not defined",
     "stack trace"),
    ("Exception in thread \"main\" java.lang.IllegalStateException\n"
     "    at com.acme.App.run(App.java:7)", "stack trace"),
    ("I keep getting TypeError: unsupported operand type(s) for +: 'int' and 'str'", "stack trace"),
    ("const xs = items.map(x => x.id);\nconsole.log(xs);", "code"),
    ("SELECT id, name FROM users WHERE age > 30;", "code"),
    ("#include <stdio.h>\nint main(void) {\n    return 0;\n}", "code"),
])
def test_code_blocks_stack_traces_and_code_go_to_the_coder(
        router: Router, by_domain: dict[str, str], text: str, reason: str) -> None:
    decision = router.route([user(text)])
    assert (decision.expert, decision.reason) == (by_domain["coding"], reason)


@pytest.mark.parametrize("text", [
    "If x = 5, what is 2x + 3?",
    "y = mx + b: what does m represent?",
    "Dear Anna,\nThanks for the lovely dinner; we had a great time.\nBest, Tom",
    "Error: I forgot my password, what should I do?",
    "Ποια είναι η πρωτεύουσα της Ελλάδας;",
])
def test_prose_with_symbols_is_not_code(text: str) -> None:
    assert _code_evidence(text).structural is None


@pytest.mark.parametrize("text, language", [
    ("¿Cuál es la mejor época para visitar Japón?", "es"),
    ("Quelle est la différence entre un crocodile et un alligator ?", "fr"),
    ("Wie funktioniert ein Elektroauto?", "de"),
    ("Qual è la capitale della Svezia?", "it"),
    ("Qual é a melhor maneira de aprender a programar?", "pt"),
    ("Hoe laat gaat de winkel vandaag dicht?", "nl"),
    ("Jak mogę poprawić swoją kondycję?", "pl"),
    ("Bugün ne yemek yapsam?", "tr"),
    ("Làm thế nào để nấu phở ngon?", "vi"),
    ("Apa ibu kota Indonesia?", "id"),
    ("Какая погода будет завтра в Москве?", "ru"),
    ("Як приготувати борщ із буряком?", "uk"),
    ("机器学习和深度学习有什么区别？", "zh"),
    ("東京でおすすめのラーメン屋はどこですか？", "ja"),
    ("한국의 수도는 어디입니까?", "ko"),
    ("ما هي عاصمة مصر؟", "ar"),
    ("چگونه می‌توانم زبان انگلیسی یاد بگیرم؟", "fa"),
    ("भारत की राजधानी क्या है?", "hi"),
    ("מה השעה עכשיו בתל אביב?", "he"),
    ("Ποια είναι η πρωτεύουσα της Ελλάδας;", "el"),
    ("Gracias", "es"),
])
def test_non_english_text_goes_to_the_multilingual_expert(
        router: Router, by_domain: dict[str, str], text: str, language: str) -> None:
    assert detect_language(text) == language
    decision = router.route([user(text)])
    assert (decision.expert, decision.reason) == (by_domain["multilingual"], f"non-English text ({language})")


@pytest.mark.parametrize("text", [
    "Who was Simón Bolívar?", "Give me a recipe for crème brûlée.", "What does the EU GDPR require?",
    "How do I use the OS module in Python?", "Can Dan and Ben share a van?", "Why do stars die?",
    "What is the population of Zürich?", "ok", "Thanks!", "kubectl get pods shows CrashLoopBackOff",
])
def test_english_with_foreign_names_or_acronyms_stays_english(text: str) -> None:
    assert detect_language(text) == "en"


@pytest.mark.parametrize("text", [
    "¿Por qué falla?\n```python\nimport pandas as pd\ndf = pd.read_csv('ventas.csv')\n"
    "df.groupby('mes').sum().plot()\n```",
    "这段代码有什么问题？\n```java\nint[] a = new int[3];\nSystem.out.println(a[3]);\n```",
])
def test_non_english_request_that_is_mostly_code_goes_to_the_coder(
        router: Router, by_domain: dict[str, str], text: str) -> None:
    decision = router.route([user(text)])
    assert decision.expert == by_domain["coding"]
    assert decision.reason.startswith("mostly code, non-English text")


def test_non_english_request_with_a_little_code_stays_multilingual(router: Router, by_domain: dict[str, str]) -> None:
    text = ("Hola, estoy aprendiendo a programar y no entiendo bien qué hace la función `len` en este ejemplo, "
            "¿me lo puedes explicar con palabras sencillas, por favor?")
    assert router.route([user(text)]).expert == by_domain["multilingual"]


@pytest.mark.parametrize("text", [
    "Translate 'where is the train station' into German.",
    "How do you say 'thank you very much' in Japanese?",
    "What does 'carpe diem' mean in English?",
    "Write a short poem in Spanish.",
    "What is the Italian word for butterfly?",
    "Conjugate the verb 'avoir' in the present tense.",
    "Can you help me practice French conversation?",
])
def test_translation_requests_go_to_the_multilingual_expert(
        router: Router, by_domain: dict[str, str], text: str) -> None:
    assert is_translation_request(text)
    decision = router.route([user(text)])
    assert (decision.expert, decision.reason) == (by_domain["multilingual"], "translation request")


@pytest.mark.parametrize("text", [
    "Translate this Python function into Rust.",
    "How does NAT translate private addresses to a public IP?",
    "Explain the translation lookaside buffer.",
    "Explain the causes of the French Revolution.",
])
def test_code_translation_and_technical_uses_of_translate_are_not_translation_requests(text: str) -> None:
    assert not is_translation_request(text)


def test_the_last_user_turn_decides(router: Router, by_domain: dict[str, str]) -> None:
    spanish_then_english = [user("¿Qué puedo cocinar esta noche?"), ChatMessage("assistant", "Una paella."),
                            user("What is the capital of Canada?")]
    english_then_spanish = [user("What is the capital of Canada?"), ChatMessage("assistant", "Ottawa."),
                            user("¿Y cuántos habitantes tiene?")]
    assert router.route(spanish_then_english).expert == by_domain["general"]
    assert router.route(english_then_spanish).expert == by_domain["multilingual"]


def test_earlier_turns_weigh_less_but_still_count(router: Router, by_domain: dict[str, str]) -> None:
    coding = [user("Write a Python function that parses a CSV file into dicts."),
              ChatMessage("assistant", "def parse(path): ..."), user("Now make it faster.")]
    assert router.route(coding).expert == by_domain["coding"]
    alone = router.route([user("Now make it faster.")])
    with_history = router.route(coding)
    assert with_history.scores[by_domain["coding"]] > alone.scores[by_domain["coding"]]


@pytest.mark.parametrize("system", [
    "You are an expert Python programmer. Always answer with code, tests, functions, classes and type hints.",
    "Eres un asistente muy útil. Responde siempre con amabilidad y detalle.",
])
def test_a_system_prompt_does_not_dominate(router: Router, by_domain: dict[str, str], system: str) -> None:
    messages = [ChatMessage("system", system), user("Give me a tip for falling asleep faster.")]
    assert router.route(messages).expert == by_domain["general"]


@pytest.mark.parametrize("messages", [[], [user("")], [user("   ")], [user("zzqx vvkj")]])
def test_no_evidence_goes_to_the_default_expert(config: AppConfig, router: Router, messages: list) -> None:
    decision = router.route(messages)
    assert (decision.expert, decision.reason) == (config.default_expert, "below threshold: default expert")
    assert decision.confidence == decision.scores[config.default_expert] < config.router.threshold


def test_a_higher_threshold_sends_weak_matches_to_the_default(config: AppConfig) -> None:
    strict = Router(config.experts, "mistral_balanced", 0.99)
    decision = strict.route_prompt("What is the capital of Australia?")
    assert (decision.expert, decision.reason) == ("mistral_balanced", "below threshold: default expert")


def test_ties_are_broken_by_config_order(config: AppConfig) -> None:
    general, coder = config.experts[0], config.experts[2]
    experts = [coder, general.model_copy(update={"id": "first"}), general.model_copy(update={"id": "second"})]
    decision = Router(experts, coder.id, 0.0).route_prompt("What is the capital of France?")
    assert decision.scores["first"] == decision.scores["second"] > decision.scores[coder.id]
    assert decision.ranking() == ("first", "second", coder.id) and decision.expert == "first"


def test_a_near_tie_with_the_default_expert_goes_to_the_default(config: AppConfig) -> None:
    twin = config.experts[0]
    experts = [twin.model_copy(update={"id": "first"}), twin.model_copy(update={"id": "default"})]
    decision = Router(experts, "default", 0.0).route_prompt("What is the capital of France?")
    assert next(iter(decision.scores)) == "first"
    assert (decision.expert, decision.reason) == ("default", "no clear match: default expert")


# --- the decision itself -----------------------------------------------------------------------


def test_a_decision_reports_every_score_highest_first(router: Router, config: AppConfig) -> None:
    decision = router.route_prompt("Explain how a B-tree index speeds up database lookups.")
    assert set(decision.scores) == {e.id for e in config.experts}
    assert list(decision.scores.values()) == sorted(decision.scores.values(), reverse=True)
    assert (decision.expert, decision.reason) == ("mistral_balanced", "tf-idf best match")
    assert decision.confidence == decision.scores[decision.expert] == max(decision.scores.values())
    assert decision.ranking()[0] == decision.expert and set(decision.ranking()) == set(decision.scores)
    assert decision.elapsed_ms > 0


def test_the_ranking_puts_a_structural_winner_first(router: Router) -> None:
    decision = router.route([user("Tell me a joke", IMAGE)])
    assert decision.ranking()[0] == "gemma3_multimodal"
    assert len(decision.ranking()) == len(decision.scores)


def test_route_prompt_is_one_user_turn(router: Router) -> None:
    prompt = "Write a SQL query that counts orders per customer."
    a, b = router.route_prompt(prompt), router.route([user(prompt)])
    assert (a.expert, a.scores, a.reason) == (b.expert, b.scores, b.reason)


def test_experts_are_found_by_capability_and_domain_not_by_id(config: AppConfig) -> None:
    renamed = [e.model_copy(update={"id": f"x{i}"}) for i, e in enumerate(config.experts)]
    router = Router(renamed, "x0", config.router.threshold)
    assert router.route([user("hi", IMAGE)]).expert == "x3"
    assert router.route_prompt("```\nprint(1)\n```").expert == "x2"
    assert router.route_prompt("Bonjour, comment ça va ?").expert == "x4"


def test_an_unknown_default_expert_is_refused(config: AppConfig) -> None:
    with pytest.raises(ValueError, match="default expert"):
        Router(config.experts, "nobody", 0.1)


def test_concurrent_routing_gives_the_same_decisions(router: Router) -> None:
    prompts = [c["prompt"] for c in CASES[:40]]
    expected = [router.route_prompt(p).expert for p in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            assert list(pool.map(lambda p: router.route_prompt(p).expert, prompts)) == expected


def test_long_prompts_are_routed_quickly(router: Router) -> None:
    """A loose guard against a slow path creeping in (the benchmark measures the real figures)."""
    prompt = ("Our service times out under load; the database pool has twenty connections and latency grows "
              "with throughput across the replicas. ") * 20
    for _ in range(20):
        router.route_prompt(prompt[:2000])
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        router.route_prompt(prompt[:2000])
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.002


# --- the numpy TF-IDF equals scikit-learn's --------------------------------------------------


@pytest.mark.parametrize("text", [
    "What is the capital of France?",
    "def f(x):\n    return x  # don't   panic!!",
    "¿Cuál es la   mejor época?\tC++ y C# también",
    "这是什么意思？ 日本の首都は東京です。",
    "a b cd a cd  é   ",
    "I'd like 3 café-au-lait's, please — ok?",
    "Переведи «привет» на английский: hello.",
    "x" * 40 + " tiny " + "y" * 3,
])
def test_the_numpy_vectors_equal_sklearn_transform(router: Router, config: AppConfig, text: str) -> None:
    words, chars = _fit_vectorizers([doc for e in config.experts for doc in _profile_documents(e)],
                                    [doc for e in config.experts for doc in _sentences(e)])
    assert len(text) < _MAX_CHAR_NGRAM_CHARS
    expected = np.concatenate((words.transform([text]).toarray()[0], chars.transform([text]).toarray()[0]))
    ids, values = router._model.vector(text.lower())
    actual = np.zeros_like(expected)
    actual[ids] = values
    np.testing.assert_allclose(actual, expected, atol=1e-12)


# --- the profiles in the configs ---------------------------------------------------------------


def test_both_configs_carry_the_same_routing_data() -> None:
    embedded, production = load_config(EMBEDDED_CONFIG), load_config(PRODUCTION_CONFIG)
    assert embedded.router == production.router
    assert [(e.id, e.domain, e.routing) for e in embedded.experts] == \
           [(e.id, e.domain, e.routing) for e in production.experts]


def test_every_expert_has_a_substantial_profile(config: AppConfig) -> None:
    for expert in config.experts:
        assert len(expert.routing.keywords) >= 30 and len(expert.routing.examples) >= 20, expert.id
