"""What the fronts and the model host share: where the host listens, and what a lease grants.

The host serves a small HTTP API on a unix socket in the user's private runtime folder (`core.local_ipc`): POST
/lease/{expert} (the grant as one JSON line, then the connection stays open for the lease's life), GET /attach (a
front's lifeline), GET /states, POST /experts/{expert}/{load|unload} and POST /report/{expert}. Refusals are
OpenAI-shaped errors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from core.config import AppConfig
from core.local_ipc import check_socket_path, runtime_dir


@dataclass(frozen=True)
class HostAddress:
    """One host per configuration file and content: servers started with the same file share a host (and so its
    runners); a test's own config gets its own. Sockets and the lock live in the private runtime folder, logs in
    the config's run_dir."""

    socket: Path
    lock: Path
    runners: Path  # the runners' sockets and vLLM's ipc sockets, in a folder as private as the host's
    log: Path
    log_dir: Path

    @classmethod
    def for_config(cls, config_path: str | Path, config: AppConfig) -> "HostAddress":
        """Raises `core.local_ipc.NotPrivate` if the runtime folder is not this user's alone."""
        path = Path(config_path).resolve()
        digest = hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:12]
        private, run_dir = runtime_dir(), Path(config.server.run_dir)
        name = f"host-{digest}"
        return cls(socket=check_socket_path(private / f"{name}.sock"), lock=private / f"{name}.lock",
                   runners=private / name, log=run_dir / f"{name}.log", log_dir=run_dir / f"{name}-runners")


@dataclass(frozen=True)
class Grant:
    """What a lease gives the front: where to send the request and under which model name. A local runner is
    reached on its unix `socket` with its `api_key` (fresh at every start); a remote one at `base_url`."""

    runner: str
    base_url: str
    model: str
    pid: int | None
    socket: str | None = None
    api_key: str | None = None

    def render(self) -> bytes:
        return orjson.dumps({"runner": self.runner, "base_url": self.base_url, "model": self.model, "pid": self.pid,
                             "socket": self.socket, "api_key": self.api_key})

    @classmethod
    def parse(cls, line: bytes) -> "Grant":
        fields = orjson.loads(line)
        return cls(fields["runner"], fields["base_url"], fields["model"], fields["pid"], fields.get("socket"),
                   fields.get("api_key"))
