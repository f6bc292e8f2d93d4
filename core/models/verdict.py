"""The quality gate's decisions, kept beside the int8 checkpoint (`quality.json`), one per CPU path: what that path
serves instead of it, if anything, and why. Written by `make models`; read by the host at every runner start, so
a start never measures anything. A path no gate has judged has no verdict: its runner serves the config as is."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERDICT_FILE = "quality.json"


@dataclass(frozen=True)
class Verdict:
    """`serve_model` is a folder name beside the checkpoint (itself when it passed or was forced); `cpu` is the
    CPU path the figures were measured on, since numerics differ from one to the next."""

    passed: bool
    serve_model: str
    serve_dtype: str
    why: str
    cpu: str
    figures: dict[str, Any] = field(default_factory=dict)
    forced: bool = False

    def write(self, checkpoint: Path) -> None:
        """Record this verdict for its CPU path, keeping the other paths' verdicts."""
        paths = _read(checkpoint)
        paths[self.cpu] = asdict(self)
        (checkpoint / VERDICT_FILE).write_text(json.dumps({"paths": paths}, indent=2) + "\n")

    def served_folder(self, checkpoint: Path) -> Path:
        return checkpoint if self.serve_model == checkpoint.name else checkpoint.parent / self.serve_model


def read_verdict(checkpoint: str | Path, cpu: str) -> Verdict | None:
    """The verdict on `checkpoint` for the CPU path `cpu`; None where no gate judged it (a hub id, a production
    model, another machine)."""
    try:
        return Verdict(**_read(Path(checkpoint))[cpu])
    except (KeyError, TypeError):
        return None


def _read(checkpoint: Path) -> dict[str, Any]:
    try:
        paths = json.loads((checkpoint / VERDICT_FILE).read_text())["paths"]
        return paths if isinstance(paths, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
