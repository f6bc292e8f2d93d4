"""The environment variables by which the host turns on a runner's patches (engine options of the same names).

Names only, in a module of their own: the host sets them without importing the patches, one of which needs torch
(1.4 s of a host's start)."""
from __future__ import annotations

COMPACT_JSON = "CAPIBARA_COMPACT_JSON"  # core.host.compact_tool_json
FAST_SAMPLER = "CAPIBARA_FAST_SAMPLER"  # core.host.fast_sampler
FORCED_TOOL_JSON = "CAPIBARA_FORCED_TOOL_JSON"  # core.host.forced_tool_json (the tool-call parser's name)
FORK_ENGINE_CORE = "CAPIBARA_FORK_ENGINE_CORE"  # core.host.fork_engine_core
