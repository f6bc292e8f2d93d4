"""Operating the suite as an operator does: the start scripts run for real on free ports (experts on
the fake upstream, so a start takes seconds), and the ARM-Axion optimisation script rewrites real
configs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port, host_pids, make_config, write_config
from core.config import load_config

SCRIPTS = REPO / "start_scripts"
KINDS = {"standard": ("start_all_models_server.sh", "multi_model_server.log"),
         "streaming": ("start_streaming_server.sh", "streaming_server.log"),
         "consensus": ("start_consensus_server.sh", "consensus_server.log")}
AXION = [sys.executable, str(REPO / "core" / "axion_improvements.py")]
PROFILE = json.loads((REPO / "configs" / "axion_profile.json").read_text())


def server_pids(port: int) -> list[int]:
    """Live (not zombie) capibara6 server processes started with --port PORT."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"--port" in args and args[args.index(b"--port") + 1] == str(port).encode() and state not in "ZX" \
                and any(a.startswith(b"servers.") for a in args):
            found.append(int(entry.name))
    return found


class Ops:
    """The scripts with an environment of our own: config, run dir, and no CAPIBARA_* from outside."""

    def __init__(self, run_dir: Path, config: Path):
        self.run_dir = run_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CAPIBARA_")}
        self.env.update(CAPIBARA_CONFIG=str(config), CAPIBARA_RUN_DIR=str(run_dir), CAPIBARA_STOP_TIMEOUT="20")

    def run(self, script: str, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPTS / script), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)

    def pid_file(self, kind: str) -> Path:
        return self.run_dir / f"capibara6_{kind}.pid"


@pytest.fixture
def ops_config(tmp_path, fake_upstream) -> Path:
    """A config of the test's own (experts on the fake upstream), so that its model host is the test's too."""
    return make_config(tmp_path, engine="fake", upstream=fake_upstream.url, name="ops.json")[0]


@pytest.fixture
def ops(tmp_path, ops_config):
    ops = Ops(tmp_path / "run", ops_config)
    yield ops
    ops.run("stop_all.sh")  # whatever a failed test left running


@pytest.mark.parametrize("kind", KINDS)
def test_start_script_starts_answers_and_stops_its_server(ops, kind):
    script, log_name = KINDS[kind]
    port = free_port()
    started = ops.run(script, CAPIBARA_PORT=str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    pid_file, log = ops.pid_file(kind), ops.run_dir / log_name
    assert f"http://127.0.0.1:{port}" in started.stdout
    assert str(pid_file) in started.stdout and str(log) in started.stdout
    pid = int(pid_file.read_text())
    assert server_pids(port) == [pid]
    health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    assert health["status"] == "ok" and health["server"] == kind
    assert log.read_text().strip(), "the server logs to the announced file"

    status = ops.run(script, "status")
    assert status.returncode == 0 and f"pid {pid}" in status.stdout and "/health ok" in status.stdout
    again = ops.run(script, "start", CAPIBARA_PORT=str(port))
    assert again.returncode == 0 and "already running" in again.stdout and int(pid_file.read_text()) == pid

    stopped = ops.run(script, "stop")
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
    assert server_pids(port) == [] and not pid_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert ops.run(script, "status").returncode == 3
    assert ops.run(script, "stop").returncode == 0, "stopping a stopped server is not an error"


def test_a_bad_config_fails_the_start_with_the_error_shown(ops, tmp_path, ops_config):
    config = json.loads(ops_config.read_text())
    config["experts"][1]["engine"]["kv_cache_dtype"] = "fp4"
    bad = write_config(tmp_path / "bad.json", config)
    port = free_port()
    result = ops.run("start_all_models_server.sh", CAPIBARA_CONFIG=str(bad), CAPIBARA_PORT=str(port))
    assert result.returncode != 0
    assert "configuration error" in result.stderr and "experts.1.engine.kv_cache_dtype" in result.stderr
    assert not ops.pid_file("standard").exists() and server_pids(port) == []


def test_a_server_that_dies_at_start_shows_the_end_of_its_log(ops):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = ops.run("start_streaming_server.sh", CAPIBARA_PORT=str(port))
    assert result.returncode != 0
    assert "did not come up: the process exited" in result.stderr
    assert "address already in use" in result.stderr, "the last log lines carry the reason"
    assert not ops.pid_file("streaming").exists()


def test_a_start_that_times_out_stops_what_it_started(ops):
    port = free_port()
    result = ops.run("start_consensus_server.sh", CAPIBARA_PORT=str(port), CAPIBARA_START_TIMEOUT="0")
    assert result.returncode != 0 and "no answer" in result.stderr
    assert server_pids(port) == [] and not ops.pid_file("consensus").exists()


def test_stop_never_signals_a_process_that_is_not_our_server(ops):
    ops.run_dir.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        ops.pid_file("standard").write_text(f"{other.pid}\n")
        result = ops.run("start_all_models_server.sh", "stop")
        assert result.returncode == 0 and "not a capibara6 standard server" in result.stdout
        assert other.poll() is None, "the unrelated process must survive"
        assert not ops.pid_file("standard").exists()
    finally:
        other.kill()
        other.wait()


def test_start_all_prints_what_to_curl_and_stop_all_ends_all_three(ops):
    ports = {kind: free_port() for kind in KINDS}
    env = {f"CAPIBARA_{kind.upper()}_PORT": str(port) for kind, port in ports.items()}
    assert ops.run("start_all.sh", CAPIBARA_PORT="9999").returncode == 2, "one port cannot serve three servers"

    started = ops.run("start_all.sh", **env)
    assert started.returncode == 0, started.stdout + started.stderr
    pids = {}
    for kind, port in ports.items():
        url = f"http://127.0.0.1:{port}"
        assert f"curl {url}/health" in started.stdout and f"{url}/v1/chat/completions" in started.stdout
        assert requests.get(f"{url}/health", timeout=5).json()["server"] == kind
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert "capibara_requests" in {family.name for family in text_string_to_metric_families(metrics)}
        pids[kind] = int(ops.pid_file(kind).read_text())
    assert len(host_pids(ops.env["CAPIBARA_CONFIG"])) == 1, "the three servers share one model host"

    stopped = ops.run("stop_all.sh")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for kind, port in ports.items():
        assert f"{kind} server stopped (pid {pids[kind]})" in stopped.stdout
        assert server_pids(port) == [] and not ops.pid_file(kind).exists()
    assert "model host stopped" in stopped.stdout and host_pids(ops.env["CAPIBARA_CONFIG"]) == []


# ---------------------------------------------------------------- arm-axion-improvements

def test_axion_rewrite_of_the_embedded_config_passes_validation(tmp_path):
    output = tmp_path / "variants" / "axion.json"
    result = subprocess.run([*AXION, str(REPO / "configs" / "embedded.json"), "--output", str(output),
                             "--target", "arm"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rewritten, original = load_config(output), load_config(REPO / "configs" / "embedded.json")
    for before, after in zip(original.experts, rewritten.experts):
        engine = after.engine
        assert after.model == before.model, "relative model paths still reach the same folder"
        assert after.engine.chat_template == before.engine.chat_template and Path(after.engine.chat_template).is_file()
        assert (engine.kv_cache_dtype, engine.max_seq_len_to_capture, engine.enforce_eager) == ("fp8", 8192, False)
        assert (engine.num_scheduler_steps, engine.enable_chunked_prefill) == (2, True)
        own = PROFILE["experts"][after.id]
        assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (own["max_num_seqs"],
                                                                         own["max_num_batched_tokens"])
        assert engine.max_model_len == before.engine.max_model_len and engine.dtype == before.engine.dtype
    assert "kv_cache_dtype=fp8 needs AVX-512 or AMX" in result.stderr and "absent on ARM" in result.stderr
    assert "graph capture needs a GPU" in result.stderr


def test_axion_rewrite_of_the_production_config_passes_validation(tmp_path):
    output = tmp_path / "config.json"
    result = subprocess.run([*AXION, str(REPO / "configs" / "config.json"), "--output", str(output),
                             "--target", "gpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(e.engine.kv_cache_dtype == "fp8" for e in load_config(output).experts)
    assert "kv_cache_dtype" not in result.stderr and "graph capture" not in result.stderr, "a GPU honours both"


@pytest.mark.parametrize("target, fp8_honoured", [("arm", False), ("x86-avx2", False), ("x86-avx512", True),
                                                  ("gpu", True)])
def test_axion_target_report_says_what_the_platform_cannot_honour(target, fp8_honoured, tmp_path, capsys):
    from core.axion_improvements import main
    assert main([str(REPO / "configs" / "config.json"), "--dry-run", "--target", target]) == 0
    report = capsys.readouterr().err
    assert f"target {target}" in report
    assert ("kv_cache_dtype=fp8 needs AVX-512 or AMX" in report) is not fp8_honoured
    assert ("dtype=bfloat16 without native bfloat16" in report) is (target == "x86-avx2")


def test_axion_dry_run_prints_a_diff_and_writes_nothing(tmp_path):
    config = tmp_path / "embedded.json"
    shutil.copy(REPO / "configs" / "embedded.json", config)
    before = config.read_bytes()
    dry = subprocess.run([*AXION, str(config), "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"--- {config}\n+++ {config}\n@@ ")
    assert '+        "kv_cache_dtype": "fp8",' in dry.stdout and '+        "max_num_batched_tokens": 2048' in dry.stdout
    assert config.read_bytes() == before and list(tmp_path.iterdir()) == [config]

    in_place = subprocess.run([*AXION, str(config)], capture_output=True, text=True)
    assert in_place.returncode == 0 and f"wrote {config}" in in_place.stderr
    assert load_config(config).experts[0].engine.kv_cache_dtype == "fp8"
    rewritten = config.read_bytes()
    again = subprocess.run([*AXION, str(config), "--dry-run"], capture_output=True, text=True)
    assert again.stdout == "" and "no changes" in again.stderr and config.read_bytes() == rewritten


def test_axion_never_writes_a_config_that_fails_validation(tmp_path, capsys):
    from core.axion_improvements import main
    profile = write_config(tmp_path / "profile.json", {"engine": {"kv_cache_dtype": "fp4"}})
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        main([str(REPO / "configs" / "embedded.json"), "--profile", str(profile), "--output", str(output)])
    assert exit_info.value.code == 1
    assert "not valid" in capsys.readouterr().err and not output.exists()


def test_axion_leaves_non_vllm_experts_alone(tmp_path, capsys):
    from core.axion_improvements import main
    path, data = make_config(tmp_path)
    remote = {"kind": "remote", "base_url": "http://10.0.0.5:8000", "remote_model": "aya_expanse_multilingual"}
    data["experts"][4]["engine"] = remote
    config = write_config(path, data)
    assert main([str(config)]) == 0
    rewritten = json.loads(config.read_text())["experts"]
    assert rewritten[4] == data["experts"][4], "the remote expert is left as it was"
    assert all(e["engine"]["kv_cache_dtype"] == "fp8" for e in rewritten[:4]), "the vLLM experts get the profile"
    assert load_config(config).experts[4].engine.kind == "remote"  # and the rewritten config is valid
    err = capsys.readouterr().err
    assert "aya_expanse_multilingual: engine kind 'remote' has no vLLM settings" in err
    assert "[aya_expanse_multilingual]" not in err, "no platform warning for an expert without a runner"
