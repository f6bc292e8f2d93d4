"""Where model preparation writes, and so where the servers, the gate, the tests and the benches read."""
from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"
FLOAT32_MODEL = MODELS / "SmolLM2-135M-Instruct"  # the reference: the GGUF file dequantised once
INT8_MODEL = MODELS / "SmolLM2-135M-Instruct-W8A8"  # what the embedded config serves when it passes the gate
MARKER = ".prepared"  # written last, so a half-prepared folder is never taken for a finished one
