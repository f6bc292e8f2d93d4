"""The tree's rules, read from the source (docs/architecture.md): the fronts reach the host only through its
protocol module, core/ and tests/ never import bench/, no module of core/ imports itself back in a circle, and the
host and fronts start without the engine's imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_SHARED = "core.host.protocol"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module a file imports, at the top or inside a function (a deferred import is still a dependency);
    `from package import submodule` depends on the submodule, not on the package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def graph(folder: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (REPO / folder).rglob("*.py")}
    names = frozenset(modules)
    return {name: {m for m in imports(path, names) if m in modules and m != name} for name, path in modules.items()}


def test_the_fronts_import_only_the_hosts_protocol():
    for name, deps in graph("core").items():
        if name.startswith("core.front"):
            reached = {d for d in deps if d.startswith("core.host") and d != "core.host"}
            assert reached <= {HOST_SHARED}, f"{name} imports the host's implementation: {reached - {HOST_SHARED}}"


def test_neither_core_nor_tests_import_bench():
    for folder in ("core", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            offending = {m for m in imports(path) if m == "bench" or m.startswith("bench.")}
            assert not offending, f"{path.relative_to(REPO)} imports {offending}"


def test_core_has_no_import_circle():
    edges = graph("core")
    # A package imports its __init__ implicitly; an edge to a package means its __init__ module.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_the_circle_check_can_fail(tmp_path, monkeypatch):
    """The same walk finds a circle when there is one."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "a.py").write_text("from core.b import x\n")
    (tmp_path / "core" / "b.py").write_text("import core.a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    try:
        test_core_has_no_import_circle()
    except AssertionError as error:
        assert "core.a" in str(error) and "core.b" in str(error)
    else:
        raise AssertionError("a circle of two modules went unnoticed")


def test_the_host_and_the_fronts_import_neither_torch_nor_vllm():
    """Every front's first request waits for a host's start; torch alone was 1.4 s of it (and memory in each)."""
    probe = ("import sys, core.host.server, servers.standard, servers.streaming, servers.consensus\n"
             "print(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
