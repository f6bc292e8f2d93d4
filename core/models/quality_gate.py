"""The quality gate for a quantised model: the same questions and the same text through a runner of the float32
reference and a runner of the candidate, both served by vLLM exactly as the host serves them.

Two measures, because each misses what the other sees:
- greedy answers to questions with one right answer: the candidate must keep every fact the reference gets right;
- perplexity of a fixed passage (prompt log-probabilities): the candidate may be at most PERPLEXITY_LIMIT times
  the reference. Int8 per-channel weights with per-token activations usually cost 1-3 % on models of a few
  billion parameters; a 135M model is more fragile, so 5 % leaves room for that and still catches a broken scale,
  a wrong layout or a lost layer, which cost tens of percent or more.

    python -m core.models.quality_gate [--config configs/embedded.json] [--expert phi4_fast] [--reference DIR]
                                [--candidate DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from core.config import EMBEDDED_CONFIG, ExpertConfig, load_config
from core.models.paths import FLOAT32_MODEL
from core.host.runner import RunnerProcess, cpu_flags, plan_runner, runner_key, split_cores

PERPLEXITY_LIMIT = 1.05
ANSWER_TOKENS = 48
START_TIMEOUT_S = 900.0

# (question, words of which the right answer contains at least one), lower case.
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("Who wrote the play Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in degrees Celsius at sea level?", ("100",)),
    ("Write a Python function that returns the sum of two numbers.", ("def ",)),
)

PASSAGE = (
    "The lighthouse stood at the end of a narrow strip of rock, where the sea met the sky in a line that never "
    "stayed still. For more than forty years the same family had kept its lamp burning. Every evening, a little "
    "before sunset, the keeper climbed the one hundred and twelve steps of the spiral staircase, trimmed the wick, "
    "cleaned the great glass lens and wound the clockwork that turned the light. Ships passing in the night saw "
    "two white flashes every ten seconds and knew where they were.\n\n"
    "Life on the rock was simple but never idle. Supplies came by boat once a fortnight when the weather allowed: "
    "flour, oil for the lamp, letters and newspapers that were already old. The keeper's wife kept a garden in a "
    "sheltered corner behind the cottage, and their children learned to read from the logbook, in which every "
    "storm, every passing ship and every change of the wind was written down in careful handwriting.\n\n"
    "In winter the storms were so strong that the spray reached the top of the tower, and the family would sit "
    "together in the kitchen listening to the wind. In summer the sea was calm and blue, and visitors sometimes "
    "rowed out from the village to see the lamp and hear the keeper's stories. When electricity finally reached "
    "the lighthouse and the lamp no longer needed a keeper, the family moved to the mainland. The old logbooks "
    "are now kept in the village museum, where anyone can read them."
)


@dataclass(frozen=True)
class Measurement:
    """What one model did: its greedy answers (in QUESTIONS' order) and its perplexity on PASSAGE."""

    answers: tuple[str, ...]
    perplexity: float


@dataclass(frozen=True)
class Verdict:
    passed: bool
    report: str


async def measure(base_url: str, model: str) -> Measurement:
    """Ask every question greedily and score PASSAGE, on an OpenAI-compatible vLLM server."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        answers = [await _answer(session, base_url, model, question) for question, _ in QUESTIONS]
        perplexity = await _perplexity(session, base_url, model)
    return Measurement(tuple(answers), perplexity)


async def _answer(session: aiohttp.ClientSession, base_url: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": ANSWER_TOKENS}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        return (await response.json())["choices"][0]["message"]["content"]


async def _perplexity(session: aiohttp.ClientSession, base_url: str, model: str) -> float:
    """exp of the mean negative log-probability of each passage token given the ones before it."""
    body = {"model": model, "prompt": PASSAGE, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    async with session.post(f"{base_url}/v1/completions", json=body) as response:
        response.raise_for_status()
        scored = (await response.json())["choices"][0]["prompt_logprobs"]
    # The first token has no context; each later entry maps the prompt's own token id to its log-probability.
    logprobs = [next(iter(entry.values()))["logprob"] for entry in scored if entry]
    return math.exp(-sum(logprobs) / len(logprobs))


def compare(reference: Measurement, candidate: Measurement) -> Verdict:
    """Fail if the candidate misses a fact the reference knows, or if its perplexity exceeds the limit."""
    ref_ok = [_knows(answer, words) for (_, words), answer in zip(QUESTIONS, reference.answers)]
    cand_ok = [_knows(answer, words) for (_, words), answer in zip(QUESTIONS, candidate.answers)]
    same = [ref == cand for ref, cand in zip(reference.answers, candidate.answers)]
    lines = [f"{'question':<58}{'float32':>9}{'candidate':>11}{'same text':>11}"]
    lines += [f"{question[:56]:<58}{_mark(r):>9}{_mark(c):>11}{_mark(s):>11}"
              for (question, _), r, c, s in zip(QUESTIONS, ref_ok, cand_ok, same)]
    ratio = candidate.perplexity / reference.perplexity
    lines.append(f"identical greedy answers: {sum(same)}/{len(QUESTIONS)}; facts kept: {sum(cand_ok)}/"
                 f"{sum(ref_ok)} of the reference's")
    lines.append(f"perplexity: float32 {reference.perplexity:.3f}, candidate {candidate.perplexity:.3f}, "
                 f"ratio {ratio:.4f} (limit {PERPLEXITY_LIMIT})")
    failures = [f"lost the answer to {question!r}"
                for (question, _), r, c in zip(QUESTIONS, ref_ok, cand_ok) if r and not c]
    if ratio > PERPLEXITY_LIMIT:
        failures.append(f"perplexity ratio {ratio:.4f} above {PERPLEXITY_LIMIT}")
    lines.append("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    return Verdict(not failures, "\n".join(lines))


def _knows(answer: str, words: tuple[str, ...]) -> bool:
    return any(word in answer.lower() for word in words)


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


def reference_of(candidate: ExpertConfig, folder: Path) -> ExpertConfig:
    """The candidate's expert with the float32 weights, run eagerly in float32: the plain baseline."""
    engine = candidate.engine.model_copy(update={"dtype": "float32", "quantization": None, "enforce_eager": True})
    return candidate.model_copy(update={"model": str(folder), "engine": engine})


async def measure_runner(expert: ExpertConfig, log_dir: Path) -> Measurement:
    """Start a runner for the expert on every core, measure it, stop it."""
    key = runner_key(expert)
    cores = split_cores(os.cpu_count() or 1, front_cores=0, slots=1)[0]
    runner = await RunnerProcess.start(expert, key, plan_runner(expert, cpu_flags()), cores, log_dir)
    try:
        await runner.wait_ready(START_TIMEOUT_S)
        return await measure(runner.base_url, key)
    finally:
        await runner.stop()


async def gate(config: Path, expert_id: str, reference: Path, candidate: Path | None, log_dir: Path) -> Verdict:
    """The expert of `config` (with the weights in `candidate`, by default its own) against the float32 folder
    `reference`, one runner at a time."""
    expert = load_config(config).expert(expert_id)
    if expert is None:
        raise SystemExit(f"{config}: no expert {expert_id!r}")
    if candidate is not None:
        expert = expert.model_copy(update={"model": str(candidate.resolve())})
    measured_reference = await measure_runner(reference_of(expert, reference), log_dir)
    measured_candidate = await measure_runner(expert, log_dir)
    return compare(measured_reference, measured_candidate)


def run_quality_gate(reference: Path = FLOAT32_MODEL, candidate: Path | None = None,
                     config: Path = EMBEDDED_CONFIG, expert_id: str = "phi4_fast") -> Verdict:
    with tempfile.TemporaryDirectory(prefix="quality-gate-") as logs:
        return asyncio.run(gate(config, expert_id, reference.resolve(), candidate, Path(logs)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=EMBEDDED_CONFIG)
    parser.add_argument("--expert", default="phi4_fast")
    parser.add_argument("--reference", type=Path, default=FLOAT32_MODEL, help="the float32 model folder")
    parser.add_argument("--candidate", type=Path, help="the model folder to judge (default: the expert's own)")
    args = parser.parse_args(argv)
    verdict = run_quality_gate(args.reference, args.candidate, args.config, args.expert)
    print(verdict.report)
    if not verdict.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
