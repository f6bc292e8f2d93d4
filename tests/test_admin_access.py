"""Who may load and unload experts, and where a server without a key may listen.

With an API key set, the admin routes need it like every other route. Without one they answer clients on this
machine only (403 otherwise), and a server refuses to bind an address other than loopback unless told it may
(--insecure, server.insecure or CAPIBARA_INSECURE=1), with a warning. The production config binds 0.0.0.0 and
starts with its key from the environment; the embedded default binds loopback.

Real server processes; the client that is not on loopback connects through this machine's own non-loopback
address, so the server sees that address as its peer.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, load_config
from tests.conftest import REPO, free_port, make_config, wait_http, write_config

KEY = "admin-test-key"
ADMIN = "/admin/experts/phi4_fast/load"


def own_address() -> str:
    """An address of this machine that is not loopback (the source address of a route off the machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # no packet is sent: connect only picks the route
        except OSError:
            pytest.skip("this machine has no address but loopback")
        return probe.getsockname()[0]


class Process:
    """A standard server started as an operator would, on a host of the test's choosing."""

    def __init__(self, tmp_path, config, host: str, env: dict[str, str] | None = None, args: tuple = ()):
        self.port = free_port()
        self.log = tmp_path / f"server-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if k not in ("CAPIBARA_API_KEY", "CAPIBARA_INSECURE")}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "servers.standard", "--config", str(config), "--host", host,
                 "--port", str(self.port), *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**environ, **(env or {})})

    def up(self) -> "Process":
        wait_http(f"http://127.0.0.1:{self.port}/health", 60, self.process, f"server ({self.output()})")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def launch(tmp_path):
    started: list[Process] = []

    def start(config, host: str, env: dict[str, str] | None = None, args: tuple = ()) -> Process:
        started.append(Process(tmp_path, config, host, env, args))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def config(tmp_path, fake_upstream):
    return make_config(tmp_path, engine="fake", upstream=fake_upstream.url)[0]


def assert_forbidden(response: requests.Response) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "permission_error" and error["code"] == "admin_forbidden", error


def test_without_a_key_admin_answers_loopback_clients_only(launch, config):
    server = launch(config, "0.0.0.0", args=("--insecure",)).up()
    remote = f"http://{own_address()}:{server.port}"
    for action in ("load", "unload"):
        assert_forbidden(requests.post(f"{remote}/admin/experts/phi4_fast/{action}", timeout=10))
        assert_forbidden(requests.post(f"{remote}/admin/experts/nope/{action}", timeout=10))
    assert requests.get(f"{remote}/v1/models", timeout=10).status_code == 200  # the rest is open, as asked
    local = requests.post(f"http://127.0.0.1:{server.port}{ADMIN}", timeout=30)
    assert local.status_code == 200 and local.json()["id"] == "phi4_fast", local.text


def test_with_a_key_admin_needs_it_from_everywhere(launch, config):
    server = launch(config, "0.0.0.0", env={"CAPIBARA_API_KEY": KEY}).up()
    for base in (f"http://127.0.0.1:{server.port}", f"http://{own_address()}:{server.port}"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = requests.post(base + ADMIN, headers=headers, timeout=10)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        allowed = requests.post(base + ADMIN, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert allowed.status_code == 200, allowed.text
    assert "insecure" not in server.output()


def test_a_keyless_server_refuses_to_bind_beyond_loopback(launch, config):
    for host in ("0.0.0.0", "::", own_address()):
        refused = launch(config, host)
        assert refused.process.wait(30) == 2
        assert f"refusing to serve {host} without an API key" in refused.output() and "--insecure" in \
            refused.output()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{refused.port}/health", timeout=2)
    for host in ("127.0.0.1", "localhost"):
        assert "insecure" not in launch(config, host).up().output()


@pytest.mark.parametrize("how", ["flag", "config", "environment"])
def test_insecure_is_explicit_and_warned_about(how, launch, config, tmp_path):
    if how == "config":
        data = json.loads(config.read_text())
        data["server"]["insecure"] = True
        config = write_config(tmp_path / "insecure.json", data)
    server = launch(config, "0.0.0.0", env={"CAPIBARA_INSECURE": "1"} if how == "environment" else None,
                    args=("--insecure",) if how == "flag" else ()).up()
    deadline = time.monotonic() + 5
    while "without an API key (insecure)" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    assert "WARNING" in next(line for line in server.output().splitlines() if "(insecure)" in line)


def test_the_production_config_binds_all_addresses_and_starts_with_its_key(launch, tmp_path, fake_upstream):
    """configs/config.json's server settings, as documented (CAPIBARA_API_KEY set), its experts on the fake
    upstream so that no model is loaded; without the key the same start is refused."""
    production, embedded = load_config(PRODUCTION_CONFIG).server, load_config(EMBEDDED_CONFIG).server
    assert production.host == "0.0.0.0" and not production.insecure
    assert embedded.host == "127.0.0.1" and not embedded.insecure
    data = json.loads(PRODUCTION_CONFIG.read_text())
    fake = json.loads(make_config(tmp_path, engine="fake", upstream=fake_upstream.url)[0].read_text())
    data["experts"] = [{**expert, "model": "echo", "engine": {"kind": "remote", "base_url": fake_upstream.url,
                                                              "remote_model": "echo"}} for expert in data["experts"]]
    data["server"].update(warmup=[], run_dir=fake["server"]["run_dir"], host_linger_s=1)
    path = write_config(tmp_path / "production.json", data)
    refused = launch(path, data["server"]["host"])
    assert refused.process.wait(30) == 2, refused.output()
    server = launch(path, data["server"]["host"], env={"CAPIBARA_API_KEY": KEY}).up()
    answer = requests.post(f"http://{own_address()}:{server.port}/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "phi4_fast", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
