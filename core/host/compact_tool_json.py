"""A vLLM plugin, in runners with engine.compact_json only: tool-call arguments without free whitespace.

vLLM 0.32 builds the grammar of a constrained tool call from xgrammar's JSONSchemaFormat and never limits the
whitespace between JSON tokens there (its disable_any_whitespace reaches response_format only). SmolLM2 filled
that room with newlines and was cut off at 120 tokens before the call closed, so `required` gave no call. This
one narrow patch sets xgrammar's own `max_whitespace_cnt` for the formats vLLM's tool registry makes; it checks
the versions it was written for and leaves anything else alone, and tests/test_tools.py fails if it stops applying.
"""
from __future__ import annotations

import functools
import logging
import os

from core.host.patch_switches import COMPACT_JSON as ENV  # set by the host (engine.compact_json)

MAX_WHITESPACE = 1  # one space between tokens stays legal, so a string value may hold "New York"
VLLM_VERSION = "0.32.0"
log = logging.getLogger(__name__)


def apply() -> bool:
    """Patch the tool registry's JSONSchemaFormat; False (and a warning) if vLLM is not the version checked."""
    import vllm
    import vllm.tool_parsers.structural_tag_registry as registry

    if vllm.__version__ != VLLM_VERSION or "max_whitespace_cnt" not in registry.JSONSchemaFormat.model_fields:
        log.warning("compact tool JSON not applied: written for vLLM %s, found %s", VLLM_VERSION, vllm.__version__)
        return False
    if not isinstance(registry.JSONSchemaFormat, functools.partial):
        registry.JSONSchemaFormat = functools.partial(registry.JSONSchemaFormat, max_whitespace_cnt=MAX_WHITESPACE)
    return True


def register() -> None:
    """The vLLM plugin entry point."""
    if os.environ.get(ENV) == "1":
        apply()
