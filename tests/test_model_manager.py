"""Model management over real sockets on the deterministic test engine: lazy shared loads, warm-up pool,
idle unload, LRU eviction at the cap, failed loads that recover, admission control, admin endpoints.
The same behaviours on the real vLLM engine (and memory actually returned) are in test_generation.py."""
import concurrent.futures
import time

import requests

from tests.conftest import make_config, write_config

CHAT = "/v1/chat/completions"


def chat(server, model: str, content: str = "hi there", timeout: float = 30) -> requests.Response:
    return requests.post(server.url + CHAT, json={"model": model, "messages": [{"role": "user", "content": content}]},
                         timeout=timeout)


def parallel(calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_concurrent_first_requests_share_one_load(tmp_path, start_server):
    path, config = make_config(tmp_path, engine="test")
    config["experts"][0]["engine"]["test_load_delay_s"] = 1.0
    server = start_server("standard", write_config(path, config))
    assert server.health()["experts"]["phi4_fast"]["state"] == "unloaded"
    responses = parallel([lambda: chat(server, "phi4_fast")] * 6)
    assert [r.status_code for r in responses] == [200] * 6
    stats = server.stats()["experts"]["phi4_fast"]
    assert stats["loads"] == 1 and stats["requests"] == 6


def test_warm_pool_is_loaded_at_start(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test", warmup=["phi4_fast", "qwen_coder"])
    server = start_server("standard", path)
    server.wait_state("phi4_fast", "ready", timeout=10)
    server.wait_state("qwen_coder", "ready", timeout=10)
    states = {k: v["state"] for k, v in server.health()["experts"].items()}
    assert [k for k, v in states.items() if v == "ready"] == ["phi4_fast", "qwen_coder"]


def test_idle_expert_is_unloaded_and_probes_do_not_count_as_use(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test", idle_timeout_s=1.5, idle_check_interval_s=0.2)
    server = start_server("standard", path)
    assert chat(server, "qwen_coder").status_code == 200
    deadline = time.monotonic() + 10
    while server.health()["experts"]["qwen_coder"]["state"] == "ready":  # probing all the while
        server.stats()
        assert time.monotonic() < deadline, "idle expert was never unloaded"
        time.sleep(0.1)
    assert server.health()["experts"]["qwen_coder"]["state"] == "unloaded"
    assert server.stats()["experts"]["qwen_coder"]["unloads"] == 1
    assert chat(server, "qwen_coder").status_code == 200  # and it comes back on demand
    assert server.stats()["experts"]["qwen_coder"]["loads"] == 2


def test_least_recently_used_idle_expert_is_evicted_at_the_cap(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test", max_loaded_experts=2)
    server = start_server("standard", path)
    for model in ("phi4_fast", "qwen_coder", "phi4_fast", "mistral_balanced"):
        assert chat(server, model).status_code == 200
    states = {k: v["state"] for k, v in server.health()["experts"].items()}
    assert states["phi4_fast"] == "ready" and states["mistral_balanced"] == "ready"
    assert states["qwen_coder"] == "unloaded"
    assert server.stats()["experts"]["qwen_coder"]["unloads"] == 1


def test_failed_load_is_a_retryable_503_then_recovers(tmp_path, start_server):
    weights = tmp_path / "weights.bin"
    path, config = make_config(tmp_path, engine="test")
    config["experts"][1]["model"] = str(weights)
    server = start_server("standard", write_config(path, config))
    response = chat(server, "mistral_balanced")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "expert_load_failed" and "mistral_balanced" in error["message"]
    assert str(tmp_path) not in error["message"]  # no file paths leak to clients
    health = server.health()["experts"]["mistral_balanced"]
    assert health["state"] == "failed" and health["error"]
    assert chat(server, "phi4_fast").status_code == 200  # other experts are unaffected
    weights.write_bytes(b"now it exists")
    assert chat(server, "mistral_balanced").status_code == 200
    assert server.health()["experts"]["mistral_balanced"]["state"] == "ready"


def test_full_queue_is_refused_with_429(tmp_path, start_server):
    path, config = make_config(tmp_path, engine="test")
    expert = config["experts"][0]
    expert.update(max_concurrency=1, max_queue=1)
    expert["engine"]["test_token_delay_s"] = 0.3
    server = start_server("standard", write_config(path, config))
    responses = parallel([lambda: chat(server, "phi4_fast", "one two three")] * 5)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 429 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and "Retry-After" in refused.headers


def test_request_waiting_on_a_slow_load_gets_a_retryable_503(tmp_path, start_server):
    path, config = make_config(tmp_path, engine="test")
    config["experts"][2]["engine"]["test_load_delay_s"] = 3
    config["experts"][2]["load_timeout_s"] = 0.5
    server = start_server("standard", write_config(path, config))
    response = chat(server, "qwen_coder")
    assert response.status_code == 503 and response.json()["error"]["code"] == "expert_loading"
    server.wait_state("qwen_coder", "ready", timeout=10)  # the load itself went on
    assert chat(server, "qwen_coder").status_code == 200


def test_admin_load_and_unload(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test")
    server = start_server("standard", path)
    loaded = requests.post(server.url + "/admin/experts/aya_expanse_multilingual/load", timeout=10)
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    unloaded = requests.post(server.url + "/admin/experts/aya_expanse_multilingual/unload", timeout=10)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
    assert requests.post(server.url + "/admin/experts/nobody/load", timeout=10).status_code == 404
    assert requests.post(server.url + "/admin/experts/phi4_fast/explode", timeout=10).status_code == 404


def test_models_lists_experts_with_state_and_effective_settings(tmp_path, start_server):
    path, _ = make_config(tmp_path, engine="test", warmup=["phi4_fast"])
    server = start_server("standard", path)
    server.wait_state("phi4_fast", "ready", timeout=10)
    body = requests.get(server.url + "/v1/models", timeout=5).json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert len(by_id) == 5 and by_id["phi4_fast"]["state"] == "ready"
    assert by_id["phi4_fast"]["object"] == "model" and by_id["phi4_fast"]["engine"]["kind"] == "test"
