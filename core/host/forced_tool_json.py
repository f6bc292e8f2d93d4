"""A vLLM plugin, in runners with engine.forced_tool_json: a call forced to one function is its arguments' JSON alone.

vLLM 0.32 forces a named tool call through the parser's structural tag, so the model must write the whole envelope
(`<tool_call>\\n{"name": "get_weather", "arguments": `) under the grammar, one allowed token at a time. SmolLM2
spelled it letter by letter ("t", "oo", "l", "_", "c", "al", "l") and lost the thread: asked "Weather in Paris?"
at temperature 0 it wrote the city as "cet_cet_cet..." until max_tokens. vLLM's standard path asks for the arguments
alone under the function's schema (`{"city":"Paris"}`); this takes it for a named choice, and for "required" with
one function (the same call), on parsers whose envelope holds only the name. "required" among several tools and
"auto" keep the structural tag (bench/bench_tool_calls.py measures both paths); there the closing `</tool_call>`, also
spelled token by token, is the last thing max_tokens cuts, and a call whose JSON is whole is read all the same
(streamed, the client already had it). It checks the vLLM version and the names it wraps; tests/test_tools.py fails
if they change.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os

from core.host.patch_switches import FORCED_TOOL_JSON as ENV  # set by the host to the runner's tool-call parser

VLLM_VERSION = "0.32.0"
ENVELOPE_OF_NAME_AND_ARGUMENTS = frozenset({"hermes"})  # parsers whose calls vLLM's standard JSON path renders alike
# DelegatingParser's steps that read the request's tool choice and the tool parser's supports_required_and_named.
DECIDING_STEPS = ("adjust_request", "_extract_tool_calls", "_extract_tool_calls_streaming")
log = logging.getLogger(__name__)


def apply(parser_name: str) -> bool:
    """Route calls forced to one function to vLLM's JSON path; False (and a warning) where that is not known to fit."""
    import vllm
    from vllm.entrypoints.openai.chat_completion import protocol
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.tool_parsers import ToolParserManager

    if parser_name not in ENVELOPE_OF_NAME_AND_ARGUMENTS:
        log.warning("forced tool JSON not applied: parser %r does not write calls as a name and arguments",
                    parser_name)
        return False
    steps = [getattr(DelegatingParser, name, None) for name in DECIDING_STEPS + ("_apply_structural_tag",)]
    if vllm.__version__ != VLLM_VERSION or None in steps or not hasattr(protocol, "ChatCompletionNamedToolChoiceParam"):
        log.warning("forced tool JSON not applied: written for vLLM %s, found %s", VLLM_VERSION, vllm.__version__)
        return False
    parser_class = ToolParserManager.get_tool_parser(parser_name)
    if not getattr(parser_class.extract_tool_calls, "forced_tool_json", False):
        parser_class.extract_tool_calls = _reading_a_cut_closing_tag(parser_class.extract_tool_calls)
    if not getattr(DelegatingParser._apply_structural_tag, "forced_tool_json", False):
        DelegatingParser._apply_structural_tag = _unless_named(DelegatingParser._apply_structural_tag)
        for name in DECIDING_STEPS:
            setattr(DelegatingParser, name, _as_named_when_forced(getattr(DelegatingParser, name), parser_class,
                                                                  protocol))
    return True


def named(request) -> bool:
    """A tool choice that names one function (a string choice is "none", "auto" or "required")."""
    return request.tool_choice is not None and not isinstance(request.tool_choice, str)


def _unless_named(apply_structural_tag):
    """DelegatingParser._apply_structural_tag, skipped for a named choice: the tool parser then sets its schema."""

    @functools.wraps(apply_structural_tag)
    def wrapper(self, request):
        return request if named(request) else apply_structural_tag(self, request)

    wrapper.forced_tool_json = True
    return wrapper


def one_function_choice(request, protocol):
    """The named choice a request forces: its own, or under "required" its one function's; None otherwise."""
    if named(request):
        return request.tool_choice
    tools = getattr(request, "tools", None) or []
    if (request.tool_choice == "required" and isinstance(request, protocol.ChatCompletionRequest) and len(tools) == 1
            and isinstance(tools[0], protocol.ChatCompletionToolsParam)):
        return protocol.ChatCompletionNamedToolChoiceParam(function={"name": tools[0].function.name})
    return None


def _as_named_when_forced(step, parser_class, protocol):
    """A DelegatingParser step that tells this request's tool parser (one per request) which path it takes, and sees
    a call forced to one function as a named choice; the request keeps its own choice outside the step, so the
    finish reason stays OpenAI's ("tool_calls" for required, "stop" for named)."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if not isinstance(self._tool_parser, parser_class):
            return step(self, *args, **kwargs)
        request = signature.bind(self, *args, **kwargs).arguments["request"]
        own, forced = request.tool_choice, one_function_choice(request, protocol)
        self._tool_parser.supports_required_and_named = forced is not None
        request.tool_choice = forced or own
        try:
            return step(self, *args, **kwargs)
        finally:
            request.tool_choice = own

    return wrapper


def without_a_cut_closing_tag(text: str, start: str, end: str) -> str:
    """`text` without the start of `end` that max_tokens left after the last call's JSON, if that is where it ends."""
    last = text.rfind(start)
    if last < 0 or end in text[last:]:
        return text
    tail = text.rstrip()
    cut = next((n for n in range(len(end) - 1, 0, -1) if tail.endswith(end[:n])), 0)
    return tail[:len(tail) - cut]


def _reading_a_cut_closing_tag(extract_tool_calls):
    """The parser's extract_tool_calls, given the output without a closing tag that max_tokens cut."""

    @functools.wraps(extract_tool_calls)
    def wrapper(self, model_output, request):
        text = without_a_cut_closing_tag(model_output, self.tool_call_start_token, self.tool_call_end_token)
        return extract_tool_calls(self, text, request)

    wrapper.forced_tool_json = True
    return wrapper


def register() -> None:
    """The vLLM plugin entry point."""
    parser_name = os.environ.get(ENV)
    if parser_name:
        apply(parser_name)
