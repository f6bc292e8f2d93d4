"""The model host and its runners against other local processes, and their faults (issue 22, the host's half).

Hostile processes are real: as root, the tests run them as `nobody` (uid 65534) to play another local user. The
runner tests start one real vLLM runner (float32, eager) behind a real front.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import requests

from core.config import load_config
from core.host.lifecycle import HostError, RunnerPool, State
from core.host.model_host import ModelHost
from core.host.protocol import Grant, HostAddress
from core.host.runner_log import OutputCopy, RotatingLog
from tests.conftest import REPO, Server, alive, host_pids, make_config, process_tree, write_config

NOBODY = 65534
ROOT = os.getuid() == 0
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi there"}]


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python `code` run as another local user (the process drops root before it runs)."""
    assert ROOT, "the tests of another user's processes run as root"
    prelude = f"import os, socket, sys; os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, timeout=30)


CONNECT = """
try:
    sock = socket.socket(socket.AF_UNIX); sock.settimeout(5); sock.connect(sys.argv[1])
    sock.sendall(sys.argv[2].encode()); print(sock.recv(200).decode(errors="replace"))
except OSError as error:
    print(type(error).__name__)
"""


def get(path: str, where: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET over a unix socket as this user, without any of our client code."""
    async def run() -> tuple[int, str]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(where)) as session:
            async with session.get(f"http://x{path}", headers=headers or {}) as response:
                return response.status, await response.text()
    return asyncio.run(run())


def lease(address: HostAddress, expert: str) -> Grant:
    """A grant from the host, as a front gets it (the lease ends as the connection closes)."""
    async def run() -> Grant:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(address.socket))) as session:
            async with session.post(f"http://host/lease/{expert}") as response:
                assert response.status == 200, await response.text()
                return Grant.parse(await response.content.readline())
    return asyncio.run(run())


def tcp_listeners(pids: set[int]) -> set[int]:
    """The TCP ports the processes listen on (IPv4 and IPv6), from /proc."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    ports = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        ports.update(inodes[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in inodes)
    return ports


def answer_to_http(port: int) -> bytes:
    """What a TCP listener says to a plain HTTP request without a key."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return sock.recv(200)
        except (TimeoutError, ConnectionResetError):
            return b""


@pytest.fixture
def xdg(monkeypatch):
    """A runtime base of the test's own, short enough for socket paths; this process and its fronts use it."""
    base = Path(tempfile.mkdtemp(prefix="c6-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


# ---------------------------------------------------------------- one real runner


@pytest.fixture(scope="module")
def real(tmp_path_factory, real_engine):
    """A standard front whose phi4_fast runner is up; the front's environment holds secrets the runner must not
    see."""
    tmp = tmp_path_factory.mktemp("hardening")
    path, config = make_config(tmp, engine="float32-eager", warmup=["phi4_fast"], host_linger_s=30)
    server = Server("standard", path, tmp / "standard.log",
                    env={"OPENAI_API_KEY": "sk-front-secret", "CAPIBARA_TEST_SECRET": "front-secret"}).wait_healthy()
    try:
        server.wait_state("phi4_fast", "ready", timeout=600)
        yield server, HostAddress.for_config(path, load_config(path))
    finally:
        server.stop()


def test_models_and_health_show_no_usable_runner_address(real):
    server, _ = real
    engine = server.models()["phi4_fast"]["engine"]
    shown = json.dumps(engine) + json.dumps(server.health())
    assert engine["base_url"] is None and engine["pid"]
    assert "http://" not in shown and ".sock" not in shown


def test_the_runner_socket_refuses_requests_without_its_key(real):
    server, address = real
    grant = lease(address, "phi4_fast")
    assert grant.socket and grant.api_key and grant.base_url == ""
    assert Path(grant.socket).parent == address.runners and stat.S_IMODE(address.runners.stat().st_mode) == 0o700
    for path in ("/v1/models", "/v1/completions"):
        status, _ = get(path, grant.socket)
        assert status == 401, path
        status, _ = get(path, grant.socket, {"Authorization": "Bearer not-the-key"})
        assert status == 401, path
    status, body = get("/v1/models", grant.socket, {"Authorization": f"Bearer {grant.api_key}"})
    assert status == 200 and grant.model in body
    cmdline = Path(f"/proc/{grant.pid}/cmdline").read_bytes()
    assert grant.api_key.encode() not in cmdline and b"--uds" in cmdline and b"--port" not in cmdline
    if ROOT:  # another user cannot even connect: the folder is ours alone
        assert as_nobody(CONNECT, grant.socket, "GET /v1/models HTTP/1.0\r\n\r\n").stdout.strip() == \
            "PermissionError"


def test_no_tcp_port_of_the_runner_or_host_answers_http(real):
    """The runner's HTTP server has no TCP port; what vLLM's engine still listens on (torch's gloo, on loopback)
    does not speak HTTP, and probing it leaves the engine working."""
    server, address = real
    pid = server.runner_pid("phi4_fast")
    (host,) = host_pids(server.config)
    tree = set(process_tree(pid)) | {host}
    ports = sorted(tcp_listeners(tree))
    with ThreadPoolExecutor(len(ports) or 1) as pool:  # a silent listener holds its probe for the 3 s timeout
        answers = dict(zip(ports, pool.map(answer_to_http, ports)))
    assert not [port for port, answer in answers.items() if answer.startswith(b"HTTP/")], answers
    assert tcp_listeners({host}) == set()
    response = requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO, "max_tokens": 4},
                             timeout=120)
    assert response.status_code == 200, response.text


def test_the_runner_environment_is_scrubbed_to_the_allowlist(real):
    server, _ = real
    pid = server.runner_pid("phi4_fast")
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
    assert "OPENAI_API_KEY" not in environ and "CAPIBARA_TEST_SECRET" not in environ
    assert environ["CAPIBARA_FAST_SAMPLER"] == "1" and environ["CAPIBARA_COMPACT_JSON"] == "1"  # the plan's
    assert environ["VLLM_API_KEY"] and "PATH" in environ
    assert Path(environ["VLLM_RPC_BASE_PATH"]).stat().st_mode & 0o077 == 0


def test_unload_returns_once_the_runner_processes_are_gone(real):
    server, _ = real
    pid = server.runner_pid("phi4_fast")
    tree = process_tree(pid)
    assert len(tree) >= 2  # the server and its engine core
    response = requests.post(server.url + "/admin/experts/phi4_fast/unload", timeout=60)
    assert response.status_code == 200, response.text
    assert not any(alive(p) for p in tree), [p for p in tree if alive(p)]
    assert requests.post(server.url + "/admin/experts/phi4_fast/load", timeout=600).status_code == 200


def test_the_host_stops_with_its_runners_within_5_s(real):
    """SIGTERM to a host with a runner up (its front gone first, or it would start another host)."""
    server, address = real
    pid = server.runner_pid("phi4_fast")
    (host,) = host_pids(server.config)
    tree = process_tree(pid) + [host]
    assert server.stop() == 0 and alive(pid) and alive(host)  # the host lingers host_linger_s for its fronts
    started = time.monotonic()
    os.kill(host, signal.SIGTERM)
    while any(alive(p) for p in tree):
        assert time.monotonic() - started < 5.0, [p for p in tree if alive(p)]
        time.sleep(0.02)
    print(f"host and runner gone in {time.monotonic() - started:.2f} s")
    assert not address.socket.exists() and not address.runners.exists()  # nothing left behind but the lock


# ---------------------------------------------------------------- the private folder and the host's socket


def test_the_runtime_folder_and_host_socket_are_private(tmp_path, xdg, start_server, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    server = start_server("standard", path, env={"XDG_RUNTIME_DIR": str(xdg)})
    address = HostAddress.for_config(path, load_config(path))
    assert address.socket.parent == xdg / "capibara6"
    assert stat.S_IMODE(os.stat(xdg / "capibara6").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(address.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(address.runners).st_mode) == 0o700
    assert requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO}, timeout=30).ok


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_runtime_folder_others_may_use_is_refused(tmp_path, xdg, fake_upstream, mode):
    folder = xdg / "capibara6"
    folder.mkdir()
    folder.chmod(mode)
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    front = subprocess.run([sys.executable, "-m", "servers.standard", "--config", str(path), "--port", "1"],
                           cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert front.returncode == 2, front.stderr[-2000:]
    assert f"has mode {mode:04o}" in front.stderr and str(folder) in front.stderr
    assert list(folder.iterdir()) == []  # nothing was put in it


def test_a_runtime_folder_of_another_user_or_a_symlink_is_refused(tmp_path, xdg, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    argv = [sys.executable, "-m", "servers.standard", "--config", str(path), "--port", "1"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (xdg / "capibara6").symlink_to(elsewhere)
    front = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert front.returncode == 2 and "is not a directory" in front.stderr, front.stderr[-2000:]
    if ROOT:
        (xdg / "capibara6").unlink()
        (xdg / "capibara6").mkdir(mode=0o700)
        os.chown(xdg / "capibara6", NOBODY, NOBODY)
        front = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert front.returncode == 2 and f"belongs to uid {NOBODY}" in front.stderr, front.stderr[-2000:]


PLANT = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sock.listen(16); print("listening", flush=True)
while True:
    conn, _ = sock.accept(); conn.settimeout(2)
    try:
        data = conn.recv(1000)
    except OSError:
        data = b""
    print("got", len(data), flush=True)
    if data:
        conn.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 30\\r\\n\\r\\n{"pid": 1, "experts": {}}     ')
    conn.close()
"""


@pytest.mark.skipif(not ROOT, reason="playing another user needs root")
def test_a_socket_planted_by_another_user_is_never_talked_to(tmp_path, xdg, start_server, fake_upstream):
    """Another user's server at the host's socket path: the front hangs up on it unheard, starts the host, which
    takes the path over."""
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    folder = xdg / "capibara6"
    folder.mkdir(mode=0o700)
    address = HostAddress.for_config(path, load_config(path))
    planted = subprocess.Popen([sys.executable, "-c", PLANT, str(address.socket)], stdout=subprocess.PIPE, text=True)
    try:
        assert planted.stdout.readline().strip() == "listening"
        server = start_server("standard", path, env={"XDG_RUNTIME_DIR": str(xdg)})
        assert requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO}, timeout=30).ok
        assert os.stat(address.socket).st_uid == 0 and stat.S_IMODE(os.stat(address.socket).st_mode) == 0o600
    finally:
        planted.kill()
        out = planted.communicate()[0]
    assert "got" in out, "the front never tried the planted socket"
    assert all(line == "got 0" for line in out.splitlines() if line.startswith("got")), out


@pytest.mark.skipif(not ROOT, reason="playing another user needs root")
def test_the_host_refuses_another_user_even_through_a_loosened_folder(tmp_path, xdg, start_server, fake_upstream):
    path, _ = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    server = start_server("standard", path, env={"XDG_RUNTIME_DIR": str(xdg)})
    address = HostAddress.for_config(path, load_config(path))
    request = "GET /states HTTP/1.0\r\n\r\n"
    assert as_nobody(CONNECT, str(address.socket), request).stdout.strip() == "PermissionError"
    for folder in (xdg, xdg / "capibara6"):  # a mistake of the operator's: the host still checks who connects
        folder.chmod(0o711)
    address.socket.chmod(0o666)
    try:
        answer = as_nobody(CONNECT, str(address.socket), request).stdout
        assert answer.startswith("HTTP/1.") and " 403 " in answer.splitlines()[0], answer
    finally:
        for folder in (xdg, xdg / "capibara6"):
            folder.chmod(0o700)
        address.socket.chmod(0o600)
    assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"  # its own fronts still get in


# ---------------------------------------------------------------- faults


def hold_lease(address: HostAddress, expert: str) -> socket.socket:
    """One of the expert's slots, taken straight from the host and held until the socket is closed."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(address.socket))
    sock.sendall(f"POST /lease/{expert} HTTP/1.1\r\nHost: host\r\nContent-Length: 0\r\n\r\n".encode())
    received = b""
    while b"api_key" not in received and b"pid" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def one_slot(tmp_path: Path, start_server, upstream_url: str, **expert) -> tuple[Server, HostAddress]:
    path, config = make_config(tmp_path, engine="fake", upstream=upstream_url)
    config["experts"][0].update(max_concurrency=1, **expert)
    server = start_server("standard", write_config(path, config))
    return server, HostAddress.for_config(path, load_config(path))


def queued(server: Server, expert: str = "phi4_fast") -> int:
    return server.stats()["experts"][expert]["queued_requests"]


def test_a_queued_request_gets_a_retryable_503_within_its_deadline(tmp_path, start_server, fake_upstream):
    """The expert's one slot is taken: a streamed request waits in the host's queue only until its own deadline,
    then gets queue_timeout (a JSON error: no header was sent yet), and leaves the queue."""
    server, address = one_slot(tmp_path, start_server, fake_upstream.url, request_timeout_s=2.0)
    holder = hold_lease(address, "phi4_fast")
    try:
        started = time.monotonic()
        response = requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO, "stream": True},
                                 timeout=30)
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_timeout" and int(response.headers["Retry-After"]) >= 1
    assert 2.0 <= waited < 3.0, waited
    assert queued(server) == 0
    assert requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO}, timeout=30).ok


def test_a_client_that_disconnects_while_queued_leaves_the_queue(tmp_path, start_server, fake_upstream):
    server, address = one_slot(tmp_path, start_server, fake_upstream.url)
    holder = hold_lease(address, "phi4_fast")
    body = json.dumps({"model": "phi4_fast", "messages": HELLO, "stream": True}).encode()
    waiter = socket.create_connection(("127.0.0.1", server.port))
    waiter.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 5
    while queued(server) != 1:
        assert time.monotonic() < deadline, server.stats()["experts"]["phi4_fast"]
        time.sleep(0.05)
    waiter.close()  # gone while queued
    while queued(server) != 0:
        assert time.monotonic() < deadline, "the host still queues a request whose client left"
        time.sleep(0.05)
    holder.close()
    response = requests.post(server.url + CHAT, json={"model": "phi4_fast", "messages": HELLO}, timeout=5)
    assert response.status_code == 200, response.text  # neither slot leaked
    assert server.stats()["experts"]["phi4_fast"]["active_requests"] == 0


class BrokenRunners(RunnerPool):
    """Runner processes replaced by a sleep, then an error of any kind, or a load that never ends."""

    failure: Exception | None = ValueError("a bug in the plan")
    start_s = 0.05

    async def _start_local(self, runner) -> None:
        await asyncio.sleep(self.start_s)
        if self.failure is not None:
            raise self.failure


def broken_host(tmp_path: Path, **server) -> ModelHost:
    path, _ = make_config(tmp_path, restart_backoff_s=0.4, max_restart_backoff_s=1.0, **server)
    loaded = load_config(path)
    address = HostAddress.for_config(path, loaded)
    return ModelHost(loaded, address, BrokenRunners(loaded, address))


async def test_any_load_failure_is_failed_and_retried_with_exponential_backoff(tmp_path):
    host = broken_host(tmp_path)
    retry_hints = []
    for attempt in range(4):
        with pytest.raises(HostError) as failed:
            async with host.lease("phi4_fast"):
                pass
        assert failed.value.code == "expert_load_failed"
        state = host.states()["phi4_fast"]
        assert state["state"] == "failed" and "a bug in the plan" in state["error"]
        with pytest.raises(HostError) as backing_off:  # at once: no new start, a hint when to come back
            async with host.lease("phi4_fast"):
                pass
        assert backing_off.value.code == "restart_backoff" and backing_off.value.retry_after >= 1
        retry_hints.append(failed.value.retry_after)
        await asyncio.sleep(failed.value.retry_after + 0.05)
    assert retry_hints == [0.4, 0.8, 1.0, 1.0]  # doubling, up to max_restart_backoff_s
    assert host.states()["phi4_fast"]["load_failures"] == 4
    host.pool.failure = None
    async with host.lease("phi4_fast"):
        pass
    state = host.states()["phi4_fast"]
    assert (state["state"], state["error"], state["loads"]) == ("ready", None, 1)
    await host.close()


async def test_a_cancelled_load_is_neither_a_success_nor_clears_the_error(tmp_path):
    host = broken_host(tmp_path)
    with pytest.raises(HostError):
        async with host.lease("phi4_fast"):
            pass
    await asyncio.sleep(0.45)
    host.pool.failure, host.pool.start_s = None, 30.0
    waiting = asyncio.create_task(host.load("phi4_fast"))
    await asyncio.sleep(0.1)
    runner = host.experts["phi4_fast"].runner
    assert runner.state is State.LOADING
    runner.loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    state = host.states()["phi4_fast"]
    assert state["state"] == "unloaded" and "a bug in the plan" in state["error"]
    assert (state["loads"], state["load_failures"], state["load_cancels"]) == (0, 1, 1)
    await host.close()


async def test_the_idle_reaper_never_unloads_a_runner_a_lease_is_waiting_for(tmp_path):
    host = broken_host(tmp_path)
    host.pool.failure, host.pool.start_s = None, 0.5
    runner = host.experts["phi4_fast"].runner
    entered = asyncio.Event()

    async def use() -> None:
        async with host.lease("phi4_fast"):
            entered.set()

    task = asyncio.create_task(use())
    await asyncio.sleep(0.1)
    assert runner.state is State.LOADING and not runner.idle  # admitted, waiting for the load
    await task
    assert entered.is_set() and runner.idle
    await host.close()


# ---------------------------------------------------------------- runner logs


def test_runner_output_rotates_by_size(tmp_path):
    """A real process's output through the copier: the log and one older file, each under the cap, the newest
    lines kept."""
    log_path = tmp_path / "runner.log"
    script = "import sys\nfor i in range(40000): sys.stdout.write(f'line {i:06d} ' + 'x' * 60 + '\\n')\n"

    async def run() -> None:
        read_end, write_end = os.pipe()
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=write_end)
        os.close(write_end)
        await OutputCopy(read_end, RotatingLog(log_path, max_bytes=1_000_000, backups=1)).task
        await process.wait()

    asyncio.run(run())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["runner.log", "runner.log.1"], files
    assert all(p.stat().st_size <= 1_000_000 for p in tmp_path.iterdir())
    assert log_path.read_text().rstrip().endswith("line 039999 " + "x" * 60)
    assert (tmp_path / "runner.log.1").stat().st_size > 500_000  # the older file is a whole one, not a sliver


# ---------------------------------------------------------------- upstream reads follow the request's deadline


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_silence_lasts_until_the_requests_deadline_not_a_fixed_read_timeout(fake_upstream, stream):
    """A runner's client has no read timeout of its own: a hung answer ends at the deadline it is given (here
    1.5 s), and a cap (read_timeout_s, remote experts) still cuts a silence shorter than the deadline."""
    from core.upstream import Failure, Upstream, UpstreamError

    body = {"model": "echo[[hang]]", "messages": HELLO, "stream": stream}

    async def silence(read_timeout_s: float | None, deadline_s: float) -> float:
        upstream = Upstream(fake_upstream.url, where="the test's upstream", read_timeout_s=read_timeout_s)
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(UpstreamError) as raised:
                if stream:
                    async for _ in upstream.stream(CHAT, body, started + deadline_s):
                        pass
                else:
                    await upstream.complete(CHAT, body, started + deadline_s)
        finally:
            await upstream.close()
        assert raised.value.failure is Failure.TIMEOUT
        return asyncio.get_running_loop().time() - started

    assert 1.5 <= await silence(None, 1.5) < 2.5
    assert 0.5 <= await silence(0.5, 30.0) < 1.5
