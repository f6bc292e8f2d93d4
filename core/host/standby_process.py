"""`python -m core.host.standby_process`: a runner that has done its imports and waits for its command line.

Importing torch and vLLM is the first ten seconds of every runner start here. The host keeps one such process
ready (the zygote pattern, `core.host.standby`): it imports what a start imports, says so on its output, then
reads one JSON line from stdin, `{"argv": [...], "env": {...}}`, takes that environment as its own and runs vLLM's
OpenAI server exactly as `python -m vllm.entrypoints.openai.api_server` would. It dies with the host before that
(runner_guard), and reads nothing else.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

from core.host.runner_guard import PARENT_ENV, die_with_parent

READY_LINE = "capibara6 standby: imports done"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# What a start imports: the server module is 9.4 of the 10 s here; the engine core's and the CPU worker's add 0.7 s.
PRELOAD = (SERVER_MODULE, "vllm.v1.engine.async_llm", "vllm.v1.worker.cpu_worker")


def main() -> None:
    die_with_parent(int(os.environ[PARENT_ENV]))
    for module in PRELOAD:
        __import__(module)
    print(READY_LINE, flush=True)
    line = sys.stdin.readline()
    if not line:  # the host closed it without a start: nothing to run
        return
    order = json.loads(line)
    os.environ.clear()
    os.environ.update(order["env"])
    sys.argv = [SERVER_MODULE, *order["argv"]]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
