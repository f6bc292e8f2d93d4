"""The quality gate: its rules on made-up measurements, and its verdict on the real default against float32."""
from __future__ import annotations

import asyncio

from core.config import load_config
from core.models.quality_gate import PERPLEXITY_LIMIT, QUESTIONS, Measurement, compare, measure, measure_runner, reference_of
from tests.conftest import FLOAT32_DIR

RIGHT = tuple(f"The answer is {words[0]}." for _, words in QUESTIONS)
REFERENCE = Measurement(RIGHT, perplexity=10.0)


def test_an_identical_model_passes():
    verdict = compare(REFERENCE, REFERENCE)
    assert verdict.passed and "identical greedy answers: 10/10" in verdict.report


def test_losing_a_fact_the_reference_knows_fails():
    wrong = Measurement(("The answer is Lyon.",) + RIGHT[1:], perplexity=10.0)
    verdict = compare(REFERENCE, wrong)
    assert not verdict.passed and "What is the capital of France?" in verdict.report.splitlines()[-1]


def test_a_fact_the_reference_misses_is_not_held_against_the_candidate():
    reference = Measurement(("The answer is Lyon.",) + RIGHT[1:], perplexity=10.0)
    assert compare(reference, Measurement(("I do not know.",) + RIGHT[1:], perplexity=10.0)).passed


def test_perplexity_beyond_the_limit_fails():
    assert compare(REFERENCE, Measurement(RIGHT, perplexity=10.0 * PERPLEXITY_LIMIT * 0.999)).passed
    verdict = compare(REFERENCE, Measurement(RIGHT, perplexity=10.0 * PERPLEXITY_LIMIT * 1.001))
    assert not verdict.passed and "perplexity ratio" in verdict.report.splitlines()[-1]


def test_the_default_passes_the_gate_against_float32(vllm_server, vllm_config, tmp_path):
    """The session's runner (the embedded default: int8, compiled) against a float32 eager runner of the folder it
    was quantised from, on the same questions and passage as `make models`."""
    engine = vllm_server.models()["phi4_fast"]["engine"]
    candidate = asyncio.run(measure(engine["base_url"], engine["key"]))
    expert = load_config(vllm_config).expert("phi4_fast")
    reference = asyncio.run(measure_runner(reference_of(expert, FLOAT32_DIR), tmp_path))
    verdict = compare(reference, candidate)
    print(verdict.report)
    assert verdict.passed, verdict.report
    assert 1.0 < reference.perplexity < 100.0, "a fluent model on plain English prose"
    assert any("paris" in answer.lower() for answer in candidate.answers)
