"""The quality gate: its statistics and rules on made-up distributions, the verdict as the host applies it, and a
forced failure end to end (real gate, real runner): the servers still start, on the fallback, and say so."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import openai
import pytest

from core.config import load_config
from core.host.runner import cpu_path, plan_runner
from core.models.measure import REFERENCE_TOP_K, TOP_K, Scored
from core.models.quality_gate import Thresholds, judge, kl_lumped
from core.models.verdict import Verdict, read_verdict, serving_verdict
from tests.conftest import EMBEDDED, FLOAT32_DIR, MODEL_DIR, REPO, make_config, write_config

ZEN4 = {"x86": True, "arm": False, "arm_bf16": False, "avx512": True, "avx512_bf16": True, "amx": False,
        "gpu": False, "bf16": True}
QUESTIONS = [(f"question {i}", [f"answer{i}"]) for i in range(20)]
RIGHT = [f"It is answer{i}." for i in range(20)]


def distributions(seed: int, positions: int = 400, vocab: int = 64) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 3, (positions, vocab))
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def scored(logprobs: np.ndarray, true: np.ndarray, k: int = TOP_K) -> Scored:
    """What a side reports of these distributions: the true token's log-probability and its top k."""
    top = np.argsort(-logprobs, axis=1)[:, :k]
    return Scored(logprobs[np.arange(len(logprobs)), true], top, np.take_along_axis(logprobs, top, 1))


def gate_on(reference: np.ndarray, candidate: np.ndarray, answers=RIGHT, limits=Thresholds()):
    true = reference.argmax(1)  # a text the reference predicts well
    return judge(scored(reference, true, REFERENCE_TOP_K), scored(candidate, true), RIGHT, answers, QUESTIONS,
                 limits)


def test_the_reference_against_itself_passes_with_perfect_figures():
    reference = distributions(0)
    result = gate_on(reference, reference)
    assert result.passed and result.figures.top1 == 1.0 and result.figures.ppl_ratio == 1.0
    assert abs(result.figures.kl) < 1e-9 and result.figures.facts_kept == 1.0


def test_the_lumped_kl_is_exact_when_the_top_holds_everything_and_a_lower_bound_otherwise():
    true = np.zeros(400, np.int64)
    p, q = distributions(1, vocab=TOP_K), distributions(2, vocab=TOP_K)
    exact = (np.exp(p) * (p - q)).sum(1)
    assert np.allclose(kl_lumped(scored(q, true, REFERENCE_TOP_K), scored(p, true)), exact)
    p, q = distributions(1, vocab=200), distributions(2, vocab=200)
    exact = (np.exp(p) * (p - q)).sum(1)
    lumped = kl_lumped(scored(q, true, REFERENCE_TOP_K), scored(p, true))
    assert np.all(lumped <= exact + 1e-9) and lumped.mean() > 0.5 * exact.mean()


def test_a_different_model_fails_on_agreement_kl_and_perplexity():
    result = gate_on(distributions(0), distributions(3))
    assert not result.passed
    assert {f.split()[0] for f in result.failures} >= {"top-1", "KL", "perplexity"}


def test_a_little_noise_passes_and_each_limit_can_be_broken_alone():
    reference = distributions(0)
    noisy = reference + np.random.default_rng(4).normal(0, 0.05, reference.shape)
    noisy -= np.log(np.exp(noisy).sum(1, keepdims=True))
    assert gate_on(reference, noisy).passed
    for name in ("min_top1", "max_kl", "max_ppl_ratio"):
        impossible = {"min_top1": 1.01, "max_kl": -1.0, "max_ppl_ratio": 0.5}[name]
        result = gate_on(reference, noisy, limits=Thresholds(**{name: impossible}))
        assert len(result.failures) == 1, (name, result.failures)


def test_a_candidate_that_wrote_nothing_usable_fails_on_every_measure():
    reference = distributions(0)
    broken = np.full_like(reference, np.nan)
    result = gate_on(reference, broken, answers=[""] * 20)
    assert not result.passed and len(result.failures) == 4, result.failures


def test_facts_are_a_rate_of_the_references_own():
    lost_one = ["I do not know."] + RIGHT[1:]
    assert gate_on(distributions(0), distributions(0), lost_one).figures.facts_kept == 0.95
    assert gate_on(distributions(0), distributions(0), lost_one).passed, "one flip in 20 is within 0.80"
    lost_five = ["no"] * 5 + RIGHT[5:]
    result = gate_on(distributions(0), distributions(0), lost_five)
    assert not result.passed and result.failures[0].startswith("facts kept 0.750")


def test_thresholds_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPIBARA_GATE_MIN_TOP1", "1.01")
    assert Thresholds.from_env() == Thresholds(min_top1=1.01)


def test_the_host_serves_what_the_verdict_says(tmp_path):
    expert = load_config(REPO / "configs" / "embedded.json").expert("phi4_fast")
    int8 = tmp_path / MODEL_DIR.name
    shutil.copytree(MODEL_DIR, int8, ignore=shutil.ignore_patterns("quality.json"))
    here = expert.model_copy(update={"model": str(int8)})
    failed = Verdict(False, FLOAT32_DIR.name, "float32", "int8 failed the quality gate on this CPU (x)", "cpu")
    plan = plan_runner(here, ZEN4, failed)
    assert plan.model == str(tmp_path / FLOAT32_DIR.name) and plan.effective["dtype"] == "float32"
    assert plan.effective["precision"] == {"weights": "float32", "activations": "float32", "why": failed.why}
    assert any("FORCE_INT8" in w for w in plan.warnings)
    passed = Verdict(True, int8.name, "auto", "int8 passed the quality gate on this CPU", "cpu")
    plan = plan_runner(here, ZEN4, passed)
    assert plan.model == str(int8) and plan.effective["precision"]["weights"] == "int8" and not plan.warnings
    forced = Verdict(False, int8.name, "auto", "forced by FORCE_INT8", "cpu", forced=True)
    assert plan_runner(here, ZEN4, forced).effective["precision"]["weights"] == "int8"
    failed.write(int8)
    other = Verdict(True, int8.name, "auto", "int8 passed the quality gate on this CPU", "another cpu")
    other.write(int8)
    assert read_verdict(int8, "cpu") == failed and read_verdict(int8, "another cpu") == other
    assert read_verdict(int8, "a third cpu") is None and read_verdict(tmp_path / "elsewhere", "cpu") is None
    assert serving_verdict(int8, "a third cpu") is None, "a verdict that names no reference: served as configured"


def test_a_cpu_path_no_gate_judged_serves_the_float32_reference(tmp_path):
    """The models folder moved to another CPU, or a cap set after `make models`: int8 may round differently there,
    or not start at all (vLLM's AMX kernels under an AVX2 cap), so the reference is served until a gate runs."""
    expert = load_config(REPO / "configs" / "embedded.json").expert("phi4_fast")
    int8 = tmp_path / MODEL_DIR.name
    shutil.copytree(MODEL_DIR, int8, ignore=shutil.ignore_patterns("quality.json"))
    here = expert.model_copy(update={"model": str(int8)})
    passed = Verdict(True, int8.name, "auto", "int8 passed the quality gate on this CPU", "gated cpu",
                     reference=FLOAT32_DIR.name)
    passed.write(int8)
    assert serving_verdict(int8, "gated cpu") == passed
    assert plan_runner(here, ZEN4, serving_verdict(int8, "gated cpu")).effective["precision"]["weights"] == "int8"
    unjudged = serving_verdict(int8, "another cpu")
    assert unjudged is not None and not unjudged.judged and "another cpu" in unjudged.why
    plan = plan_runner(here, ZEN4, unjudged)
    assert plan.model == str(tmp_path / FLOAT32_DIR.name) and plan.effective["dtype"] == "float32"
    assert plan.effective["precision"] == {"weights": "float32", "activations": "float32", "why": unjudged.why}
    assert any("`make models` gates int8 on this path" in w for w in plan.warnings), plan.warnings
    assert read_verdict(int8, "another cpu") is None  # what `make models` reads: the path is still to be gated
    assert serving_verdict(tmp_path / "elsewhere", "another cpu") is None


@pytest.fixture(scope="module")
def failed_gate(tmp_path_factory, real_engine):
    """`make models` with a threshold no model can meet, on copies of the prepared folders."""
    models = tmp_path_factory.mktemp("models")
    (models / FLOAT32_DIR.name).symlink_to(FLOAT32_DIR)
    shutil.copytree(MODEL_DIR, models / MODEL_DIR.name, ignore=shutil.ignore_patterns("quality.json"))
    env = {**os.environ, "CAPIBARA_GATE_MIN_TOP1": "1.01"}
    result = subprocess.run([sys.executable, "-m", "core.models.prepare", "--output", str(models / FLOAT32_DIR.name),
                             "--int8-output", str(models / MODEL_DIR.name)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    return models, result.stdout


def test_a_failed_gate_still_serves_on_the_fallback_and_says_so(failed_gate, tmp_path, start_server):
    models, printed = failed_gate
    verdict = read_verdict(models / MODEL_DIR.name, cpu_path())
    assert verdict is not None and not verdict.passed and verdict.serve_model == FLOAT32_DIR.name
    assert "WARNING" in printed and "FORCE_INT8=1" in printed
    assert "[quality gate" in printed and "PASSED" not in printed
    figures = verdict.figures["int8"]
    if "top1" in figures:  # the int8 engine ran: real measurements, failed by the threshold alone
        assert "top-1 agreement" in verdict.why and 0.5 < figures["top1"] < 1.0 and figures["facts_reference"] >= 30
    else:  # an emulated CPU path where vLLM's int8 kernels cannot run (see the README): that failure is the verdict
        assert "did not run" in verdict.why, verdict
    path, config = make_config(tmp_path, warmup=["phi4_fast"])
    for expert in config["experts"]:
        expert["model"] = str(models / MODEL_DIR.name)
        expert["engine"]["enforce_eager"] = True  # the precision is the point here, not compilation
    server = start_server("standard", write_config(path, config))
    server.wait_state("phi4_fast", "ready", timeout=600)
    precision = server.health()["experts"]["phi4_fast"]["precision"]
    assert precision["weights"] == verdict.serve_dtype == precision["activations"], precision
    assert "failed the quality gate" in precision["why"]
    engine = server.models()["phi4_fast"]["engine"]
    assert engine["effective"]["model"] == FLOAT32_DIR.name and any("FORCE_INT8" in w for w in engine["warnings"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="phi4_fast", max_tokens=8,
                                            messages=[{"role": "user", "content": "Say hello."}])
    assert answer.choices[0].message.content.strip()


def test_make_models_left_a_verdict_for_this_cpu():
    """The folder the embedded config names was judged on this CPU path, and serves something either way."""
    verdict = read_verdict(MODEL_DIR, cpu_path())
    assert verdict is not None, "make models writes quality.json"
    assert verdict.serve_model in (MODEL_DIR.name, FLOAT32_DIR.name) and verdict.why
    assert EMBEDDED["experts"][0]["model"].endswith(MODEL_DIR.name)
