"""The router: its corpus and accuracy on prompts it never trained on, each structural rule on its own, the
classifier's probabilities and training, and the shape of a decision.

Prompts are labelled by domain, not by expert id, so they hold for any config whose experts cover the five domains.
The latency bound (p99 < 1 ms) is measured by bench/bench_router.py, not asserted here.
"""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, AppConfig, RoutingProfile, load_config
from core.protocol import ChatMessage, ImagePart, ImageURL, TextPart
from core.router import Router, classifier, dataset, evaluation, fit, language, policy
from core.router.classifier import DomainClassifier
from core.router.code import code_evidence

CASES = json.loads((Path(__file__).parent / "router_cases.json").read_text())
TRAIN, HELDOUT = dataset.load(dataset.TRAIN), dataset.load(dataset.HELDOUT)
DOMAINS = {"general", "technical", "coding", "multimodal", "multilingual"}
IMAGE = ImagePart(type="image_url", image_url=ImageURL(url="https://example.com/photo.png"))


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
    return ChatMessage(role="user", content=[TextPart(type="text", text=text), *images] if images else text)


def turn(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=text)


def case_messages(case: dict) -> list[ChatMessage]:
    """A labelled case as a conversation: optional system prompt and history, then the prompt."""
    messages = [turn("system", case["system"])] if case.get("system") else []
    history = case.get("history", [])
    if case.get("image_in_history") and not history:
        history = [["user", "Here is a photo of my bike."], ["assistant", "It is a red road bike."]]
    for i, (role, text) in enumerate(history):
        messages.append(user(text, IMAGE) if case.get("image_in_history") and i == 0 else turn(role, text))
    messages.append(user(case["prompt"], *((IMAGE,) if case.get("image") else ())))
    return messages


# --- the corpus and accuracy --------------------------------------------------------------------


def test_the_corpus_is_broad_and_its_held_out_part_separate() -> None:
    assert len(TRAIN) + len(HELDOUT) >= 2000 and len(HELDOUT) >= 500
    for examples, least in ((TRAIN, 500), (HELDOUT, 90)):
        counts = Counter(e.domain for e in examples)
        assert set(counts) == DOMAINS and min(counts.values()) >= least, counts
        assert len({e.lang for e in examples}) >= 25
        assert sum(len(e.text) > 300 for e in examples) >= 10
        assert sum("```" in e.text or "Traceback" in e.text for e in examples) >= 5

    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    assert not {normal(e.text) for e in TRAIN} & {normal(e.text) for e in HELDOUT}
    assert len({normal(e.text) for e in TRAIN}) == len(TRAIN)


def test_at_least_95_percent_top_1_on_the_held_out_prompts(router: Router, by_domain: dict[str, str]) -> None:
    misses = [(e.domain, d.expert, d.reason, e.text[:60])
              for e in HELDOUT if (d := router.route_prompt(e.text)).expert != by_domain[e.domain]]
    accuracy = 1 - len(misses) / len(HELDOUT)
    assert accuracy >= 0.95, f"held-out top-1 {accuracy:.3f}; misses: {misses}"


def test_the_labelled_conversations_are_broad_enough() -> None:
    assert len(CASES) >= 100
    assert set(Counter(c["domain"] for c in CASES)) == DOMAINS
    assert len({c["lang"] for c in CASES}) >= 10
    assert sum(bool(c.get("image") or c.get("image_in_history")) for c in CASES) >= 10


def test_accuracy_on_the_labelled_conversations(router: Router, by_domain: dict[str, str]) -> None:
    """tests/router_cases.json: images, history and system prompts, which the corpus's single turns lack."""
    misses = []
    per_domain: Counter[str] = Counter()
    for case in CASES:
        decision = router.route(case_messages(case))
        if decision.expert != by_domain[case["domain"]]:
            misses.append((case["domain"], decision.expert, decision.reason, case["prompt"][:60]))
            per_domain[case["domain"]] += 1
    accuracy = 1 - len(misses) / len(CASES)
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f}; misses: {misses}"
    for domain, total in Counter(c["domain"] for c in CASES).items():
        assert per_domain[domain] / total <= 0.1, f"{domain}: {per_domain[domain]} of {total} missed: {misses}"


# --- structural rules, one at a time -----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "What is in this picture?", "def f(x): return x", "¿Qué ves aquí?"])
def test_any_image_goes_to_the_vision_expert(router: Router, by_domain: dict[str, str], text: str) -> None:
    decision = router.route([user(text, IMAGE)])
    assert (decision.expert, decision.reason, decision.confidence) == (by_domain["multimodal"], "image content", 1.0)


def test_an_image_earlier_in_the_conversation_still_needs_vision(router: Router, by_domain: dict[str, str]) -> None:
    messages = [user("Look at this.", IMAGE), turn("assistant", "A cat on a sofa."), user("What colour is it?")]
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
    assert code_evidence(text).structural is None


@pytest.mark.parametrize("text", [
    "make it sound friendlier", "make a haiku about autumn", "go through my essay and fix the commas",
    "export my contacts from android to iphone?", "brew a good cup of coffee", "curl my hair without heat", "go on",
    "make this sound natural in spanish for my dating profile: 'dog dad, bad cook, good listener'",
])
def test_english_verbs_that_name_commands_are_prose(text: str) -> None:
    """make, go, export, brew and curl start many chat turns typed in lower case: they are commands only with a
    command's arguments."""
    assert code_evidence(text).structural is None


@pytest.mark.parametrize("text", [
    "<task>Write a two-sentence reply to the review below.</task>\n<review>Late, but the shoes are lovely.</review>",
    "<context>We sell shoes online.</context>\n<question>What should our return policy say?</question>",
])
def test_prompt_sections_marked_with_plain_tags_are_prose(text: str) -> None:
    """Agents mark a prompt's parts with tags of their own naming; only HTML's elements, attributes or namespaced
    names make markup code."""
    assert code_evidence(text).structural is None


@pytest.mark.parametrize("text", [
    "<div class=\"card\">\n  <p>Hello</p>\n</div>", "<ul><li>one</li></ul>", "<my-widget></my-widget>",
    '<input type="text" name="q">', "<!DOCTYPE html>",
])
def test_html_is_code(text: str) -> None:
    assert code_evidence(text).structural == "code"


@pytest.mark.parametrize("text", [
    "make install", "make -j8 fails with missing header", "make CC=clang", "go run main.go", "go test ./...",
    "go mod tidy", "export PATH=$PATH:~/bin", "brew install wget", "curl -X POST https://example.com/api",
])
def test_the_same_verbs_with_a_commands_arguments_are_code(text: str) -> None:
    assert code_evidence(text).structural == "code"


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
    decision = router.route([user(text)])
    assert (decision.expert, decision.reason) == (by_domain["multilingual"], f"non-English text ({language})")


@pytest.mark.parametrize("text", [
    "Who was Simón Bolívar?", "Give me a recipe for crème brûlée.", "What does the EU GDPR require?",
    "How do I use the OS module in Python?", "Can Dan and Ben share a van?", "Why do stars die?",
    "What is the population of Zürich?", "ok", "Thanks!", "zfs vs btrfs", "kubectl get pods shows CrashLoopBackOff",
])
def test_english_with_foreign_names_or_acronyms_stays_english(router: Router, text: str) -> None:
    assert not router.route([user(text)]).reason.startswith("non-English")


def test_the_language_detector_reads_letters_only() -> None:
    assert language.guess("Wie funktioniert ein Elektroauto?").language == "de"
    assert language.guess("Wie funktioniert ein Elektroauto?").english < policy.ENGLISH_FLOOR
    assert language.guess("12 + 30 = ?") == language.ENGLISH
    assert language.guess("hola\ud800 que tal, ¿cómo estás?").language == "es"  # a lone surrogate is no error


@pytest.mark.parametrize("text", [
    "¿Por qué falla?\n```python\nimport pandas as pd\ndf = pd.read_csv('ventas.csv')\n"
    "df.groupby('mes').sum().plot()\n```",
    "这段代码有什么问题？\n```java\nint[] a = new int[3];\nSystem.out.println(a[3]);\n```",
    "这段代码为什么不能运行？请帮我看看。\nfor i in range(10)\n    print(i)",
    "Warum funktioniert das nicht?\nSELECT name, COUNT(*) FROM kunden GROUP BY stadt;",
])
def test_non_english_request_that_is_mostly_code_goes_to_the_coder(
        router: Router, by_domain: dict[str, str], text: str) -> None:
    assert router.route([user(text)]).expert == by_domain["coding"]


@pytest.mark.parametrize("text, language", [
    ("这段代码为什么不能运行？请帮我看看。\nfor i in range(10)\n    print(i)", "zh"),
    ("Warum funktioniert das nicht?\nSELECT name, COUNT(*) FROM kunden GROUP BY stadt;", "de"),
])
def test_a_foreign_turn_that_is_mostly_code_is_code(router: Router, text: str, language: str) -> None:
    """The language rule comes first, but a turn that is mostly code still goes to the coder."""
    assert router.route([user(text)]).reason == f"mostly code, non-English text ({language})"


def test_non_english_request_with_a_little_code_stays_multilingual(router: Router, by_domain: dict[str, str]) -> None:
    text = ("Hola, estoy aprendiendo a programar y no entiendo bien qué hace la función `len` en este ejemplo, "
            "¿me lo puedes explicar con palabras sencillas, por favor?")
    assert router.route([user(text)]).expert == by_domain["multilingual"]


@pytest.mark.parametrize("text", [
    "Translate 'where is the train station' into German.",
    "How do you say 'thank you very much' in Japanese?",
    "Write a short poem in Spanish.",
    "What is the Italian word for butterfly?",
    "Conjugate the verb 'avoir' in the present tense.",
    "Can you help me practice French conversation?",
])
def test_language_requests_written_in_english_go_to_the_multilingual_expert(
        router: Router, by_domain: dict[str, str], text: str) -> None:
    assert router.route([user(text)]).expert == by_domain["multilingual"]


@pytest.mark.parametrize("text, domain", [
    ("Translate this Python function into Rust.", "coding"),
    ("How does NAT translate private addresses to a public IP?", "technical"),
    ("Explain the translation lookaside buffer.", "technical"),
    ("Explain the causes of the French Revolution.", "general"),
])
def test_code_translation_and_technical_uses_of_translate_are_not_language_requests(
        router: Router, by_domain: dict[str, str], text: str, domain: str) -> None:
    assert router.route([user(text)]).expert == by_domain[domain]


# --- conversations -----------------------------------------------------------------------------


def test_the_last_user_turn_decides(router: Router, by_domain: dict[str, str]) -> None:
    spanish_then_english = [user("¿Qué puedo cocinar esta noche?"), turn("assistant", "Una paella."),
                            user("What is the capital of Canada?")]
    english_then_spanish = [user("What is the capital of Canada?"), turn("assistant", "Ottawa."),
                            user("¿Y cuántos habitantes tiene?")]
    assert router.route(spanish_then_english).expert == by_domain["general"]
    assert router.route(english_then_spanish).expert == by_domain["multilingual"]


@pytest.mark.parametrize("last, domain", [
    ("Back to English: how do I delete a git branch on the remote as well?", "coding"),
    ("ok in English please: what is a good name for a cat?", "general"),  # multilingual on the turns' mean
    ("Now in English: what should I pack for a weekend hike?", "general"),  # (likewise)
])
def test_earlier_foreign_turns_do_not_make_an_english_turn_multilingual(
        router: Router, by_domain: dict[str, str], last: str, domain: str) -> None:
    messages = [user("Hola, tengo una pregunta sobre mi trabajo, ¿me ayudas?"),
                turn("assistant", "¡Claro que sí! Dime qué necesitas y lo vemos juntos."), user(last)]
    decision = router.route(messages)
    assert decision.expert == by_domain[domain] and decision.scores[by_domain["multilingual"]] < 0.2, decision


def test_earlier_turns_weigh_less_but_still_count(router: Router, by_domain: dict[str, str]) -> None:
    coding = [user("Write a Python function that parses a CSV file into dicts."),
              turn("assistant", "def parse(path): ..."), user("Now make it faster.")]
    alone = router.route([user("Now make it faster.")])
    with_history = router.route(coding)
    assert with_history.expert == by_domain["coding"] != alone.expert
    assert with_history.scores[by_domain["coding"]] > alone.scores[by_domain["coding"]]


@pytest.mark.parametrize("system", [
    "You are an expert Python programmer. Always answer with code, tests, functions, classes and type hints.",
    "Eres un asistente muy útil. Responde siempre con amabilidad y detalle.",
])
def test_a_system_prompt_does_not_dominate(router: Router, by_domain: dict[str, str], system: str) -> None:
    messages = [turn("system", system), user("Give me a tip for falling asleep faster.")]
    assert router.route(messages).expert == by_domain["general"]


# --- defaults, ties and odd configs ------------------------------------------------------------


@pytest.mark.parametrize("messages", [[], [user("")], [user("   ")], [user("zzqx vvkj")]])
def test_no_known_words_go_to_the_default_expert(config: AppConfig, router: Router, messages: list) -> None:
    decision = router.route(messages)
    assert (decision.expert, decision.reason) == (config.default_expert, "no known words: default expert")
    assert decision.confidence == decision.scores[config.default_expert]


def test_a_higher_threshold_sends_unsure_decisions_to_the_default(config: AppConfig) -> None:
    strict = Router(config.experts, "mistral_balanced", 1.0)
    decision = strict.route_prompt("What is the capital of Australia?")
    assert (decision.expert, decision.reason) == ("mistral_balanced", "below threshold: default expert")


def test_experts_sharing_a_domain_split_it_and_ties_go_in_config_order(config: AppConfig) -> None:
    general, coder = config.experts[0], config.experts[2]
    experts = [coder, general.model_copy(update={"id": "first"}), general.model_copy(update={"id": "second"})]
    decision = Router(experts, coder.id, 0.0).route_prompt("What is the capital of France?")
    assert decision.scores["first"] == decision.scores["second"] > decision.scores[coder.id]
    total = decision.scores["first"] + decision.scores["second"] + decision.scores[coder.id]
    assert total == pytest.approx(1.0, abs=1e-5)  # (each score is rounded to 6 places)
    assert decision.ranking() == ("first", "second", coder.id) and decision.expert == "first"


def test_an_expert_of_a_domain_the_classifier_never_saw_gets_no_probability(config: AppConfig) -> None:
    legal = config.experts[1].model_copy(update={"id": "legal", "domain": "legal", "routing": RoutingProfile()})
    router = Router([*config.experts, legal], config.default_expert, config.router.threshold)
    decision = router.route_prompt("Can my landlord keep my deposit for normal wear and tear?")
    assert decision.scores["legal"] == 0.0 and decision.expert != "legal"


def test_one_domain_needs_no_classifier(config: AppConfig) -> None:
    decision = Router(config.experts[:1], config.experts[0].id, 0.5).route_prompt("Explain TCP.")
    assert (decision.expert, decision.scores, decision.reason) == (config.experts[0].id, {config.experts[0].id: 1.0},
                                                                   "classifier")


def test_an_unknown_default_expert_is_refused(config: AppConfig) -> None:
    with pytest.raises(ValueError, match="default expert"):
        Router(config.experts, "nobody", 0.1)


def test_experts_are_found_by_capability_and_domain_not_by_id(config: AppConfig) -> None:
    renamed = [e.model_copy(update={"id": f"x{i}"}) for i, e in enumerate(config.experts)]
    router = Router(renamed, "x0", config.router.threshold)
    assert router.route([user("hi", IMAGE)]).expert == "x3"
    assert router.route_prompt("```\nprint(1)\n```").expert == "x2"
    assert router.route_prompt("Bonjour, comment ça va ?").expert == "x4"


# --- the decision ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Explain how a B-tree index speeds up database lookups.", "Tell me a joke",
                                  "¿Qué hora es?", "```\nprint(1)\n```", ""])
def test_scores_are_probabilities_that_sum_to_one_highest_first(router: Router, config: AppConfig, text: str) -> None:
    scores = router.route_prompt(text).scores
    assert set(scores) == {e.id for e in config.experts}
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    assert all(0.0 <= p <= 1.0 for p in scores.values()) and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_classifier_decision_is_its_most_probable_expert(router: Router) -> None:
    decision = router.route_prompt("Explain how a B-tree index speeds up database lookups.")
    assert (decision.expert, decision.reason) == ("mistral_balanced", "classifier")
    assert decision.confidence == decision.scores[decision.expert] == max(decision.scores.values())
    assert decision.ranking()[0] == decision.expert and set(decision.ranking()) == set(decision.scores)
    assert decision.elapsed_ms > 0


WORKFLOW_TASKS = {  # (task, data): written for this test, in no training file
    "general": ("Write a friendly two-sentence reply to this customer review.",
                "The cake arrived a day late but tasted wonderful, thank you."),
    "technical": ("Explain to the on-call engineer what this alert means and the likely cause.",
                  "Disk I/O wait on db-2 above 40% for 15 minutes while queries per second stayed flat."),
    "coding": ("Write a regular expression that matches the order numbers in the text.",
               "Orders ORD-2024-00017 and ORD-2023-99120 were refunded."),
    "multilingual": ("Translate the message into German, keeping the tone informal.",
                     "Hey, can we move our call to Thursday afternoon?"),
}
WORKFLOW_WRAPPERS = (
    "{task}\n\n{data}",
    "You are a step in an n8n workflow.\nInput: {data}\nTask: {task}\nOutput only the result.",
    "<instructions>{task}</instructions>\n<input>{data}</input>",
    'Return JSON with the key "result".\nTask: {task}\nText: {{{{ $json.body }}}} = {data}',
)


def test_a_workflows_wrapper_does_not_choose_the_expert(router: Router, by_domain: dict[str, str]) -> None:
    """Agents and workflow tools wrap every task in the same instructions, tags and JSON talk: the task decides.
    (The corpus before its workflow prompts sent 4 of these 16 to the coder; one may flip on another CPU.)"""
    routed = [(domain, router.route_prompt(wrapper.format(task=task, data=data)).expert)
              for domain, (task, data) in WORKFLOW_TASKS.items() for wrapper in WORKFLOW_WRAPPERS]
    assert sum(by_domain[domain] == expert for domain, expert in routed) >= 14, routed


def test_the_ranking_puts_a_structural_winner_first(router: Router) -> None:
    decision = router.route([user("Tell me a joke", IMAGE)])
    assert decision.ranking()[0] == "gemma3_multimodal"
    assert len(decision.ranking()) == len(decision.scores)


@pytest.mark.parametrize("text", ["What is the capital of France?", "Compare TCP and UDP.",
                                  "Write a Python function that reverses a list.",
                                  "¿Cuántos habitantes tiene Madrid?"])
def test_consensus_asks_the_multimodal_expert_only_when_it_fits(router: Router, text: str) -> None:
    """Experts below `policy.FIT` come after those that fit, in config order (the multimodal one is fourth)."""
    decision = router.route_prompt(text)
    assert "gemma3_multimodal" not in decision.ranking()[:3], decision.scores
    fits = router.route_prompt("Describe the chart in the attached image.")
    assert fits.ranking()[0] == "gemma3_multimodal"


def test_route_prompt_is_one_user_turn(router: Router) -> None:
    prompt = "Write a SQL query that counts orders per customer."
    a, b = router.route_prompt(prompt), router.route([user(prompt)])
    assert (a.expert, a.scores, a.reason) == (b.expert, b.scores, b.reason)


def test_concurrent_routing_gives_the_same_decisions(router: Router) -> None:
    prompts = [e.text for e in HELDOUT[::15]]
    expected = [router.route_prompt(p).expert for p in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            assert list(pool.map(lambda p: router.route_prompt(p).expert, prompts)) == expected


# --- the classifier ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(config: AppConfig) -> fit.Fitted:
    return fit.fit(*policy.training_set(policy.expert_profile(config.experts), TRAIN))


@pytest.mark.parametrize("text", [
    "What is the capital of France?",
    "def f(x):\n    return x  # don't   panic!!",
    "¿Cuál es la   mejor época?\tC++ y C# también",
    "这是什么意思？ 日本の首都は東京です。",
    "I'd like 3 café-au-lait's, please — ok?",
    "Our service times out under load; the pool has twenty connections. " * 8,  # longer than CHAR_HEAD
    "",
])
def test_the_fast_scoring_equals_sklearn(fitted: fit.Fitted, text: str) -> None:
    """The classifier scores requests without sklearn; the numbers must be sklearn's."""
    classifier = DomainClassifier(fitted.model())
    np.testing.assert_allclose(classifier.probabilities(classifier.scores(text).values), fitted.predict_proba(text),
                               atol=1e-12)


@pytest.mark.parametrize("text", ["Hello  world,\n\n  how are\tyou? x", "a", "", "日本語  テキスト", "C++ vs  C#"])
def test_the_analyzers_are_sklearns(text: str) -> None:
    """The fit passes the classifier's analyzers to sklearn; they must split text as sklearn's own would."""
    words = TfidfVectorizer(ngram_range=classifier.WORD_NGRAMS).build_analyzer()
    chars = TfidfVectorizer(analyzer="char", ngram_range=classifier.CHAR_NGRAMS,
                            preprocessor=lambda t: t[:classifier.CHAR_HEAD].lower()).build_analyzer()
    assert classifier.word_terms(text) == words(text)
    assert classifier.char_terms(text) == chars(text)


def test_training_is_deterministic(fitted: fit.Fitted, config: AppConfig) -> None:
    first, again = fitted.model(), policy.train(policy.expert_profile(config.experts), TRAIN).classifier.model
    assert (again.classes, again.words, again.chars, again.beta) == (first.classes, first.words, first.chars,
                                                                     first.beta)
    np.testing.assert_array_equal(again.weights, first.weights)
    np.testing.assert_array_equal(again.idf, first.idf)


# --- what decided ------------------------------------------------------------------------------


def test_a_classifier_decision_says_tfidf_decided(router: Router) -> None:
    decision = router.route_prompt("Write a Python function that reverses a linked list.")
    assert (decision.stage, decision.reason) == (policy.TFIDF, "classifier")
    assert decision.confidence == max(decision.scores.values())


def test_a_rule_decision_says_the_rules_decided(router: Router) -> None:
    assert router.route([user("hi", IMAGE)]).stage == policy.RULES
    assert router.route_prompt("```\nprint(1)\n```").stage == policy.RULES
    assert router.route_prompt("¿Qué hora es?").stage == policy.RULES


# --- the independent set and grouped cross-validation ------------------------------------------


@pytest.mark.parametrize("path, least_turns, least_languages", [(evaluation.INDEPENDENT, 20, 28),
                                                                (evaluation.INDEPENDENT_2, 40, 25),
                                                                (evaluation.INDEPENDENT_3, 40, 30)])
def test_the_independent_sets_are_broad_and_never_trained_on(path: Path, least_turns: int,
                                                              least_languages: int) -> None:
    cases = evaluation.load_independent(path)
    assert len(cases) >= 300 and sum(c.image for c in cases) >= 30 and len({c.lang for c in cases}) >= least_languages
    assert sum(len(c.messages) > 1 for c in cases) >= least_turns
    assert all(c.best in c.acceptable and c.acceptable <= DOMAINS for c in cases)

    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    corpus = {normal(e.text) for e in (*TRAIN, *HELDOUT)}
    assert not {normal(m.text) for c in cases for m in c.messages if m.text.strip()} & corpus


def test_the_independent_sets_share_no_prompt() -> None:
    def prompts(cases: tuple[evaluation.Case, ...]) -> set[str]:
        return {m.text for c in cases for m in c.messages if m.role == "user" and m.text.strip()}

    sets = [prompts(evaluation.load_independent(path)) for path in evaluation.INDEPENDENT_SETS]
    assert len(sets) == 3
    for first, second in combinations(sets, 2):
        assert not first & second


def test_paraphrases_share_a_group_and_never_straddle_a_fold() -> None:
    texts = ["How do I read a file line by line in Java?", "How do I read a file line by line in Go?",
             "Tell me a joke about cats."]
    groups = evaluation.paraphrase_groups(texts)
    assert groups[0] == groups[1] != groups[2]
    sample = TRAIN[::5]
    groups = evaluation.paraphrase_groups([e.text for e in sample])
    for train, test in evaluation.grouped_folds(sample):
        assert not set(groups[train]) & set(groups[test])


# --- the profiles in the configs ---------------------------------------------------------------


def test_both_configs_carry_the_same_routing_data() -> None:
    embedded, production = load_config(EMBEDDED_CONFIG), load_config(PRODUCTION_CONFIG)
    assert embedded.router == production.router
    assert [(e.id, e.domain, e.routing) for e in embedded.experts] == \
           [(e.id, e.domain, e.routing) for e in production.experts]


def test_every_expert_has_a_substantial_profile(config: AppConfig) -> None:
    """Examples and keywords join the corpus in training: they widen the vocabulary of each domain."""
    for expert in config.experts:
        assert len(expert.routing.keywords) >= 30 and len(expert.routing.examples) >= 20, expert.id
