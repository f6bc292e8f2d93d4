"""What the fronts and the model host share: where the host listens, and what a lease grants.

The host serves a small HTTP API on a unix socket: POST /lease/{expert} (the grant as one JSON line, then the
connection stays open for the lease's life), GET /attach (a front's lifeline), GET /states, POST
/experts/{expert}/{load|unload} and POST /report/{expert}. Refusals are OpenAI-shaped errors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from core.config import AppConfig


@dataclass(frozen=True)
class HostAddress:
    """One host per configuration file and content: servers started with the same file share a host (and so its
    runners); a test's own config gets its own."""

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


@dataclass(frozen=True)
class Grant:
    """What a lease gives the front: where to send the request and under which model name."""

    runner: str
    base_url: str
    model: str
    pid: int | None

    def render(self) -> bytes:
        return orjson.dumps({"runner": self.runner, "base_url": self.base_url, "model": self.model, "pid": self.pid})

    @classmethod
    def parse(cls, line: bytes) -> "Grant":
        fields = orjson.loads(line)
        return cls(fields["runner"], fields["base_url"], fields["model"], fields["pid"])
