"""Where the model host of a configuration listens: one host per configuration file and content.

Servers started with the same file share a host (and so its runners); a test's own config gets its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from core.config import AppConfig


@dataclass(frozen=True)
class HostAddress:
    socket: Path
    lock: Path
    log: Path
    log_dir: Path

    @classmethod
    def for_config(cls, config_path: str | Path, config: AppConfig) -> "HostAddress":
        path = Path(config_path).resolve()
        digest = hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:12]
        run_dir = Path(config.server.run_dir)
        name = f"host-{digest}"
        return cls(socket=run_dir / f"{name}.sock", lock=run_dir / f"{name}.lock", log=run_dir / f"{name}.log",
                   log_dir=run_dir / f"{name}-runners")
