"""Shared fixtures: real server processes on free ports, test configs, a fake OpenAI upstream, and one real vLLM
runner shared by every test that needs the engine (the session's fronts all use one config, so one model host)."""
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
from typing import NoReturn

import pytest
import requests

from core.config import relocatable
from core.harness.processes import alive, host_pids, process_tree  # noqa: F401 - the tests' process helpers too
from core.models.paths import FLOAT32_MODEL

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = json.loads((REPO / "configs" / "embedded.json").read_text())
# The embedded default's model (int8, compiled) and the float32 folder it was quantised from, which the tests of
# runner lifecycles serve eagerly: they start many runners, and an eager start skips compilation.
MODEL_DIR = (REPO / "configs" / EMBEDDED["experts"][0]["model"]).resolve()
FLOAT32_DIR = FLOAT32_MODEL
FLOAT32_EAGER = {"dtype": "float32", "enforce_eager": True}
# The fake upstream's models: plain echo, and experts that always fail, hang or answer slowly.
FAKE_MODELS = ("echo", "echo[[fail]]", "echo[[hang]]", "echo[[delay=0.05]]", "echo[[cut]]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not answer {url} within {timeout} s")


class FakeUpstream:
    """tests/fake_upstream.py in its own process on a real port."""

    def __init__(self, port: int | None = None, models: tuple[str, ...] = FAKE_MODELS, token_delay: float = 0.0,
                 api_key: str | None = None, models_delay: float = 0.0, wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tests.fake_upstream", "--port", str(self.port), "--models", ",".join(models),
                "--token-delay", str(token_delay), "--models-delay", str(models_delay)]
        if api_key:
            argv += ["--api-key", api_key]
        self.process = subprocess.Popen(argv, cwd=REPO)
        if wait:
            wait_http(self.url + "/health", 30, self.process, "fake upstream")

    def requests(self) -> list[dict]:
        return requests.get(self.url + "/_requests", timeout=5).json()["requests"]

    def open_streams(self) -> int:
        return requests.get(self.url + "/_requests", timeout=5).json()["open_streams"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_config(tmp_path: Path, *, engine: str = "vllm", upstream: str | None = None, name: str = "config.json",
                eager_first: bool = False, **server) -> tuple[Path, dict]:
    """The embedded config for a test: its own run dir (so its own model host), the real model for every expert
    (engine "vllm": the embedded default, or "float32-eager") or the fake upstream at `upstream` (engine "fake"),
    and server overrides."""
    config = copy.deepcopy(EMBEDDED)
    relocatable(config, REPO / "configs")  # the test's config file lives elsewhere
    for expert in config["experts"]:
        if engine == "vllm":
            expert["model"] = str(MODEL_DIR)
            # One process per runner for the whole test, numerics included: the eager-first swap has its own tests.
            expert["engine"]["eager_first"] = eager_first
        elif engine == "float32-eager":
            expert["model"] = str(FLOAT32_DIR)
            expert["engine"].update(FLOAT32_EAGER)
        else:
            expert["model"] = "echo"
            expert["engine"] = {"kind": "remote", "base_url": upstream, "remote_model": "echo"}
    config["server"].update({"warmup": [], "run_dir": str(tmp_path / "run"), "host_linger_s": 1, **server})
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path, config


def fake_engine(config: dict, expert_index: int, model: str) -> None:
    """Point one expert at another of the fake upstream's models (e.g. "echo[[hang]]")."""
    config["experts"][expert_index]["engine"]["remote_model"] = model


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


class Server:
    """A server process started as an operator would, with its log kept for failure messages."""

    def __init__(self, kind: str, config: Path, log: Path, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.kind = kind
        self.config = config
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
                self._give_up(f"{self.kind} server exited {self.process.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self._give_up(f"{self.kind} server not healthy after {timeout} s")

    def _give_up(self, why: str) -> NoReturn:
        """Stop a server that never came up, then fail: a fixture that raises before its `yield` gets no
        teardown, so nothing else would stop it."""
        failure = f"{why}:\n{self.tail()}"
        self.stop()
        raise AssertionError(failure)

    def wait_state(self, expert: str, state: str, timeout: float = 180.0) -> None:
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

    def models(self) -> dict[str, dict]:
        return {m["id"]: m for m in requests.get(self.url + "/v1/models", timeout=5).json()["data"]}

    def runner_pid(self, expert: str) -> int | None:
        return self.models()[expert]["engine"].get("pid")

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


def runner_metrics(server: Server, expert: str) -> str:
    """The expert's runner's own /metrics, read on its unix socket (vLLM asks no key for it; the folder is ours)."""
    from core.config import load_config
    from core.host.protocol import HostAddress
    from core.host.runner import runner_socket

    address = HostAddress.for_config(server.config, load_config(server.config))
    path = runner_socket(address.runners, server.models()[expert]["engine"]["key"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: runner\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def process_pss(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Pss")


def runner_processes(under: Path) -> set[int]:
    """The runner processes (vLLM servers and their children) whose log is under a directory."""
    marker = f"CAPIBARA_RUNNER_LOG={under}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_runner_outlives_the_suite(tmp_path_factory):
    """Runners die with their host: at the end, none that this session started may still run."""
    base = tmp_path_factory.getbasetemp()
    yield
    deadline = time.monotonic() + 30
    while runner_processes(base) and time.monotonic() < deadline:
        time.sleep(0.5)
    stray = runner_processes(base)
    for pid in stray:
        os.kill(pid, signal.SIGKILL)
    assert not stray, f"runner processes outlived the suite: {sorted(stray)}"


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


@pytest.fixture(scope="session")
def fake_upstream():
    """One fake OpenAI upstream for the session (models FAKE_MODELS)."""
    upstream = FakeUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def fake_config(tmp_path_factory, fake_upstream) -> Path:
    return make_config(tmp_path_factory.mktemp("fake"), engine="fake", upstream=fake_upstream.url)[0]


@pytest.fixture(scope="session")
def fake_server(fake_config, tmp_path_factory):
    """A standard server whose experts are all the fake upstream, for protocol edge cases."""
    server = Server("standard", fake_config, tmp_path_factory.mktemp("fake-log") / "s.log")
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


# ---------------------------------------------------------------- the real engine, shared


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory) -> Path:
    """The prepared embedded model, which every test on a real vLLM runner asks for (through its fixtures): such
    tests share one xdist lane (`pytest_collection_modifyitems`)."""
    assert MODEL_DIR.is_dir() and FLOAT32_DIR.is_dir(), "the real-engine tests need the models: run `make models`"
    lane = os.environ.get("PYTEST_XDIST_WORKER")
    if lane:  # the first lane to get here claims the engine; any other means the grouping broke
        claim = tmp_path_factory.getbasetemp().parent / "engine-lane"
        try:
            with open(claim, "x") as file:
                file.write(lane)
        except FileExistsError:
            assert claim.read_text() == lane, f"real-engine tests ran in {claim.read_text()} and {lane}: " \
                "xdist's --dist loadgroup did not group them (see the pytest pin in setup.cfg)"
    return MODEL_DIR


def pytest_configure(config: pytest.Config) -> None:
    """In one of `make test`'s two lanes, the tests' own tensor work takes one thread: two lanes on 2 cores, and
    a runner's OpenMP threads spin-wait when another lane's threads hold their core. Runners set their own."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With `make test`'s two xdist workers, tests on real runners run one after another in one lane: two runners
    starting at once would starve each other on 2 cores, and the session's runner is started once. The other
    lane takes the rest, which mostly waits on sockets and single processes."""
    for item in items:
        if "real_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("engine"))


@pytest.fixture(scope="session")
def vllm_config(tmp_path_factory, real_engine) -> Path:
    """The session's real-engine config: the five experts share one runner, warm from the start."""
    return make_config(tmp_path_factory.mktemp("vllm"), warmup=["phi4_fast"], host_linger_s=5)[0]


def _vllm_front(tmp_path_factory, vllm_config: Path, kind: str):
    """A front on the session's runner, stopped even when it never got ready (a failed setup has no teardown)."""
    server = Server(kind, vllm_config, tmp_path_factory.mktemp(f"vllm-{kind}") / f"{kind}.log")
    try:
        server.wait_healthy().wait_state("phi4_fast", "ready", timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, vllm_config):
    """The standard front (8082's kind) on the session's runner."""
    yield from _vllm_front(tmp_path_factory, vllm_config, "standard")


@pytest.fixture(scope="session")
def vllm_streaming_server(tmp_path_factory, vllm_config):
    """The streaming front (8083's kind) on the same runner."""
    yield from _vllm_front(tmp_path_factory, vllm_config, "streaming")


@pytest.fixture(scope="session")
def vllm_consensus_server(tmp_path_factory, vllm_config):
    """The consensus front (8084's kind) on the same runner."""
    yield from _vllm_front(tmp_path_factory, vllm_config, "consensus")
