"""neon_ext inside the real vLLM engine: the expert with our ops gives the same greedy text as the one without,
and /v1/models reports which ops it runs."""
import requests

from tests.conftest import make_config, write_config

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
             "Name three colours of the rainbow."]


def test_greedy_text_is_the_same_with_and_without_our_ops(tmp_path, start_server):
    path, config = make_config(tmp_path, warmup=["phi4_fast", "mistral_balanced"])
    config["experts"][0]["engine"]["neon_kernels"] = True
    server = start_server("standard", write_config(path, config))
    server.wait_state("phi4_fast", "ready")
    server.wait_state("mistral_balanced", "ready")
    models = {m["id"]: m for m in requests.get(server.url + "/v1/models", timeout=10).json()["data"]}
    ops = models["phi4_fast"]["engine"]["effective"]["neon_kernels"]
    assert set(ops["ops"]) == {"RMSNorm", "SiluAndMul", "GeluAndMul", "RotaryEmbedding"}
    assert ops["path"] == "avx2" or ops["path"] == "neon" or ops["path"] == "scalar"
    assert models["mistral_balanced"]["engine"]["effective"]["neon_kernels"] is None
    for question in QUESTIONS:
        answers = {}
        for model in ("phi4_fast", "mistral_balanced"):
            body = {"model": model, "messages": [SYSTEM, {"role": "user", "content": question}],
                    "temperature": 0, "max_tokens": 48}
            response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            answers[model] = response.json()["choices"][0]["message"]["content"]
        assert answers["phi4_fast"] == answers["mistral_balanced"] and answers["phi4_fast"]
