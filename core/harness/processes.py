"""The suite's processes as /proc shows them: trees, liveness, the model hosts of a config, memory (PSS)."""
from __future__ import annotations

from pathlib import Path


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def pss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def host_pids(config: str | Path) -> list[int]:
    """The live model hosts serving a config file (our design only)."""
    wanted = str(Path(config).resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"core.host" in args and wanted in args and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def suite_pss(config: str | Path, front_pids: list[int]) -> int:
    """Fronts, the host and every runner process, shared pages counted once (PSS)."""
    roots = front_pids + host_pids(config)
    return pss_bytes({pid for root in roots for pid in process_tree(root)})
