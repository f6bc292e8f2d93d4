"""Configuration: both shipped configs validate, and a bad value names its field."""
import copy
import json
import subprocess
import sys

import pytest

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, ConfigError, load_config, parse_config
from tests.conftest import EMBEDDED, REPO


def test_shipped_configs_validate():
    embedded = load_config(EMBEDDED_CONFIG)
    production = load_config(PRODUCTION_CONFIG)
    ids = ["phi4_fast", "mistral_balanced", "qwen_coder", "gemma3_multimodal", "aya_expanse_multilingual"]
    assert [e.id for e in embedded.experts] == ids == [e.id for e in production.experts]
    assert all(e.model.endswith("SmolLM2-135M-Instruct-W8A8") for e in embedded.experts)
    assert all(e.engine.dtype == "bfloat16" and not e.engine.enforce_eager for e in embedded.experts)
    assert len({e.system_prompt for e in embedded.experts}) == 5
    assert all(e.engine.kv_cache_memory_bytes for e in embedded.experts)
    assert all(e.engine.kv_cache_dtype == "fp8" for e in production.experts)
    assert all(e.engine.max_seq_len_to_capture == 8192 for e in production.experts)
    assert embedded.server.warmup == ("phi4_fast", "qwen_coder")


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["experts"][2]["engine"].update(kv_cache_dtype="fp9"), "experts.2.engine.kv_cache_dtype"),
    (lambda c: c["experts"][0]["sampling"].update(temperature=-1), "experts.0.sampling.temperature"),
    (lambda c: c["server"].update(warmup=["nobody"]), "server.warmup.0"),
    (lambda c: c["server"].update(idle_timeout="soon"), "server.idle_timeout"),
    (lambda c: c["experts"][1].update(id=c["experts"][0]["id"]), "experts: duplicate id"),
    (lambda c: c["router"].update(default_expert="nobody"), "router.default_expert"),
    (lambda c: c["experts"][0].pop("model"), "experts.0.model"),
])
def test_bad_config_names_the_field(mutate, field):
    config = copy.deepcopy(EMBEDDED)
    mutate(config)
    with pytest.raises(ConfigError) as error:
        parse_config(config, REPO / "configs")
    assert field in str(error.value)


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"experts": [}')
    with pytest.raises(ConfigError, match="line 1"):
        load_config(broken)


def test_server_refuses_to_start_with_bad_config(tmp_path):
    config = copy.deepcopy(EMBEDDED)
    config["experts"][3]["engine"]["max_num_seqs"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "servers.standard", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "experts.3.engine.max_num_seqs" in result.stderr
