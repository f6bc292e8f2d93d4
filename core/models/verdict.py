"""The quality gate's decisions, kept beside the int8 checkpoint (`quality.json`), one per CPU path: what that path
serves instead of it, if anything, and why. Written by `make models`; read by the host at every runner start, so
a start never measures anything. A path no gate has judged, on a checkpoint gated on other paths (the folder moved
to another CPU, or a cap set after `make models`), serves the float32 reference until `make models` judges it."""
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
    reference: str = ""  # the float32 folder beside the checkpoint that the gate measured it against
    judged: bool = True  # False: no gate ran on this path, which serves the reference until one does

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


def serving_verdict(checkpoint: str | Path, cpu: str) -> Verdict | None:
    """What a runner on `cpu` serves for `checkpoint`: its path's verdict; else, when the gate judged the checkpoint
    on other paths only, its float32 reference, since int8 rounds differently from one CPU path to the next (and
    may not start at all); else None (not a gated checkpoint: served as configured)."""
    kept = read_verdict(checkpoint, cpu)
    if kept is not None:
        return kept
    reference = next((p["reference"] for p in _read(Path(checkpoint)).values()
                      if isinstance(p, dict) and p.get("reference")), None)
    if reference is None:
        return None
    return Verdict(False, reference, "float32", f"no quality gate has judged int8 on this CPU path ({cpu})", cpu,
                   reference=reference, judged=False)


def _read(checkpoint: Path) -> dict[str, Any]:
    try:
        paths = json.loads((checkpoint / VERDICT_FILE).read_text())["paths"]
        return paths if isinstance(paths, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
