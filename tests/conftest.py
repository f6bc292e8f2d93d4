"""Shared fixtures: real server processes on free ports, test configs, and one real vLLM server per session."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = json.loads((REPO / "configs" / "embedded.json").read_text())
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_config(tmp_path: Path, *, engine: str = "vllm", name: str = "config.json", **server) -> tuple[Path, dict]:
    """The embedded config with absolute model paths, an engine kind for every expert, and server overrides."""
    config = copy.deepcopy(EMBEDDED)
    for expert in config["experts"]:
        expert["model"] = str(MODEL_DIR) if engine == "vllm" else "scripted"
        if engine != "vllm":
            expert["engine"] = {"kind": engine}
    config["server"].update({"warmup": [], **server})
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path, config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


class Server:
    """A server process started as an operator would, with its log kept for failure messages."""

    def __init__(self, kind: str, config: Path, log: Path, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.kind = kind
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_handle = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"servers.{kind}", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO, stdout=self._log_handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 120.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.kind} server exited {self.process.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.kind} server not healthy after {timeout} s:\n{self.tail()}")

    def wait_state(self, expert: str, state: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health()["experts"][expert]["state"] == state:
                return
            time.sleep(0.2)
        raise AssertionError(f"{expert} not {state} after {timeout} s: {self.health()}\n{self.tail()}")

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5).json()

    def stats(self) -> dict:
        return requests.get(self.url + "/stats", timeout=5).json()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tail(self, lines: int = 40) -> str:
        self._log_handle.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_handle.close()
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path):
    """Start servers for one test; all are stopped afterwards."""
    started: list[Server] = []

    def start(kind: str, config: Path, env: dict[str, str] | None = None, wait: bool = True,
              port: int | None = None) -> Server:
        server = Server(kind, config, tmp_path / f"{kind}-{len(started)}.log", env, port)
        started.append(server)
        return server.wait_healthy() if wait else server

    yield start
    for server in started:
        server.stop()


def warm_vllm_server(tmp_path_factory, kind: str, expert: str):
    """A server of `kind` on the real vLLM engine with `expert` loaded, stopped when the generator closes."""
    tmp = tmp_path_factory.mktemp(f"vllm-{kind}")
    path, _ = make_config(tmp, warmup=[expert], max_loaded_experts=2)
    server = Server(kind, path, tmp / f"{kind}.log").wait_healthy()
    server.wait_state(expert, "ready")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One standard server on the real vLLM engine for the whole session (phi4_fast warm)."""
    yield from warm_vllm_server(tmp_path_factory, "standard", "phi4_fast")


@pytest.fixture(scope="session")
def scripted_config(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.mktemp("scripted"), engine="test")[0]


@pytest.fixture(scope="session")
def scripted_server(scripted_config, tmp_path_factory):
    """A standard server on the deterministic test engine, for protocol edge cases."""
    server = Server("standard", scripted_config, tmp_path_factory.mktemp("scripted-log") / "s.log").wait_healthy()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_streaming_server(tmp_path_factory):
    """One streaming server (the 8083 kind) on the real vLLM engine for the whole session (qwen_coder warm)."""
    yield from warm_vllm_server(tmp_path_factory, "streaming", "qwen_coder")
