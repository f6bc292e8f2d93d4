"""`python -m core.harness.ready URL EXPERT...`: wait until a server's warm-pool experts are ready, printing each as
it comes up with the precision it serves, so `make run` returns with the pool warm and says what it got."""
from __future__ import annotations

import json
import sys
import time
import urllib.request


def main(argv: list[str] | None = None) -> int:
    url, *experts = argv if argv is not None else sys.argv[1:]
    started, pending = time.monotonic(), set(experts)
    deadline = started + 900
    while pending and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                states = json.load(response)["experts"]
        except (OSError, ValueError, KeyError):
            states = {}
        for expert in sorted(pending):
            state = states.get(expert, {})
            if state.get("state") in ("ready", "failed"):
                pending.discard(expert)
                precision = state.get("precision") or {}
                print(f"expert {expert} {state['state']} after {time.monotonic() - started:.0f} s: "
                      f"{precision.get('weights')} weights, {precision.get('activations')} activations "
                      f"({precision.get('why')})" + (f"; error: {state['error']}" if state.get("error") else ""),
                      flush=True)
        time.sleep(1)
    for expert in sorted(pending):
        print(f"expert {expert} not ready after {time.monotonic() - started:.0f} s", flush=True)
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
