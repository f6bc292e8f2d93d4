"""Tool calls as agents use them, through the OpenAI client on every port, full and streamed, on the real runner:
a `required` or named tool choice always gives calls whose arguments parse and validate against the function's
schema (vLLM's structured outputs pin them: engine.tool_strict_level "parameter"), whatever the model would say."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from core.front.consensus import Candidate, tool_vote
from tests.conftest import FLOAT32_DIR, make_config, write_config

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}
FLIGHT = {"type": "function", "function": {
    "name": "book_flight", "description": "Book a flight for some passengers",
    "parameters": {"type": "object", "$defs": {"airport": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                   "properties": {
                       "route": {"type": "object", "properties": {"from": {"$ref": "#/$defs/airport"},
                                                                  "to": {"$ref": "#/$defs/airport"}},
                                 "required": ["from", "to"], "additionalProperties": False},
                       "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                       "names": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                       "cabin": {"type": "string", "enum": ["economy", "business"]},
                       "note": {"type": "string"}},
                   "required": ["route", "passengers", "names", "cabin"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]},
                                                    "seconds": {"type": "boolean"}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]  # the setup: two tools, 120 tokens
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK, FLIGHT)}
ASK = [{"role": "user", "content": "What is the weather in Madrid right now, in celsius?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
PORTS = ("standard", "streaming", "consensus")
OPENAI_KEYS = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier",
               "consensus"}


@pytest.fixture(scope="module")
def fronts(vllm_server, vllm_streaming_server, vllm_consensus_server):
    return {"standard": vllm_server, "streaming": vllm_streaming_server, "consensus": vllm_consensus_server}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(server, stream: bool, **args) -> tuple[list[dict], str | None, str]:
    """The calls (as plain dicts), the finish reason and the text, from a full or a streamed answer."""
    body = dict(model="qwen_coder", messages=ASK, temperature=0, max_tokens=120, tools=TOOLS) | args
    if not stream:
        choice = client(server).chat.completions.create(**body).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or ()]
        return calls, choice.finish_reason, choice.message.content or ""
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for chunk in client(server).chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "type": None,
                                                      "function": {"name": None, "arguments": ""}})
                if delta.id:
                    assert call["id"] is None, "the id comes once, first"
                    call["id"], call["type"] = delta.id, delta.type
                if delta.function and delta.function.name:
                    assert not call["function"]["arguments"], "the name comes before the arguments"
                    call["function"]["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["function"]["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)], finish, text


def assert_valid(calls: list[dict]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call["id"] and call["type"] == "function"
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
@pytest.mark.parametrize("port", PORTS)
def test_required_always_gives_valid_calls(fronts, port, stream):
    calls, finish, _ = ask(fronts[port], stream, tool_choice="required")
    assert_valid(calls)
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
@pytest.mark.parametrize("port", PORTS)
def test_a_named_choice_calls_exactly_that_function_with_valid_arguments(fronts, port, stream):
    calls, finish, _ = ask(fronts[port], stream, tool_choice=NAMED)
    assert_valid(calls)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert finish == "stop"  # OpenAI's finish reason for a named choice


TERSE = [("Weather in Paris?", "get_weather"), ("is it raining in tokyo", "get_weather"),
         ("how hot is it in Rome", "get_weather"), ("time in CET pls", "get_time"), ("what's the time, UTC", "get_time")]


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
@pytest.mark.parametrize("port", PORTS)
def test_a_call_forced_to_one_function_on_a_terse_question_is_valid(fronts, port, stream):
    """A named choice, or "required" with one tool: the model writes only the arguments (engine.forced_tool_json).
    Made to spell the `<tool_call>` envelope first, SmolLM2 lost the thread on half of these and ran a string into
    max_tokens; even on the arguments alone, greedy, it looped "sunny in Tokyo, but ..." on an AMX CPU until the
    expert's tool_call_frequency_penalty."""
    functions = {"get_weather": WEATHER, "get_time": CLOCK}
    for question, name in TERSE:
        for choice, tools, finishes in (({"type": "function", "function": {"name": name}}, TOOLS, ("stop",)),
                                        ("required", [functions[name]], ("tool_calls",))):
            calls, finish, _ = ask(fronts[port], stream, messages=[{"role": "user", "content": question}],
                                   max_tokens=64, tools=tools, tool_choice=choice)
            assert_valid(calls)
            assert [c["function"]["name"] for c in calls] == [name], (question, choice)
            assert finish in finishes, (question, choice, finish)


def prompt_tokens(server, messages: list[dict], **args) -> int:
    body = {"model": "qwen_coder", "messages": messages, "max_tokens": 1, "temperature": 0} | args
    return client(server).chat.completions.create(**body).usage.prompt_tokens


def test_the_model_sees_the_tools_and_its_own_calls(vllm_server):
    """SmolLM2's chat template drops `tools` and the assistant's calls; configs/templates/smollm2_tools.jinja lists
    the tools in the system turn and writes each past call in the hermes envelope."""
    plain = prompt_tokens(vllm_server, ASK)
    assert prompt_tokens(vllm_server, ASK, tools=TOOLS) > plain + 10
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "9:00"}
    history = [*ASK, {"role": "assistant", "content": ""}, result]
    called = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}, result]
    assert prompt_tokens(vllm_server, called) > prompt_tokens(vllm_server, history) + 5


def test_a_schema_with_defs_nested_objects_arrays_and_bounds_is_honoured(vllm_server):
    body = dict(messages=[{"role": "user", "content": "Book two business seats from Madrid to Lima for Ana and "
                                                      "Luis."}], tools=[WEATHER, FLIGHT], max_tokens=200,
                tool_choice={"type": "function", "function": {"name": "book_flight"}})
    for stream in (False, True):
        calls, _, _ = ask(vllm_server, stream, **body)
        assert_valid(calls)
        assert calls[0]["function"]["name"] == "book_flight"


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
def test_auto_never_leaks_call_markup_and_none_never_calls(vllm_server, stream):
    calls, _, text = ask(vllm_server, stream, tool_choice="auto")
    assert "<tool_call>" not in text
    if calls:
        assert_valid(calls)
    calls, finish, _ = ask(vllm_server, stream, tool_choice="none")
    assert not calls and finish != "tool_calls"


def test_parallel_tool_calls_false_gives_one_call(vllm_server):
    for stream in (False, True):
        calls, _, _ = ask(vllm_server, stream, tool_choice="required", parallel_tool_calls=False)
        assert len(calls) == 1
        assert_valid(calls)


@pytest.mark.parametrize("port", PORTS)
def test_responses_carry_openai_fields_only_unless_asked(fronts, port):
    body = {"model": "qwen_coder", "messages": ASK, "max_tokens": 24, "tools": TOOLS, "tool_choice": "required",
            "temperature": 0}
    plain = requests.post(fronts[port].url + "/v1/chat/completions", json=body, timeout=300).json()
    assert set(plain) <= OPENAI_KEYS, set(plain) - OPENAI_KEYS
    assert set(plain["choices"][0]) <= {"index", "message", "logprobs", "finish_reason"}
    assert set(plain["choices"][0]["message"]) <= {"role", "content", "refusal", "tool_calls", "function_call",
                                                   "annotations", "audio"}
    raw = requests.post(fronts[port].url + "/v1/chat/completions", json={**body, "engine_fields": True},
                        timeout=300).json()
    assert set(raw) - OPENAI_KEYS or set(raw["choices"][0]) - {"index", "message", "logprobs", "finish_reason"}, \
        "engine_fields keeps what the engine sent"


def test_an_agent_loop_calls_then_reads_the_result_then_answers(vllm_server):
    """What n8n's agent or an MCP client does: call, run the tool, send the result back, get the final answer."""
    api = client(vllm_server)
    messages = list(ASK)
    first = api.chat.completions.create(model="qwen_coder", messages=messages, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    assert_valid([call.model_dump()])
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    final = api.chat.completions.create(model="qwen_coder", messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=60)
    assert final.choices[0].message.content.strip() and not final.choices[0].message.tool_calls


def test_consensus_reports_how_many_candidates_agreed(vllm_consensus_server):
    body = {"messages": ASK, "max_tokens": 120, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
    response = requests.post(vllm_consensus_server.url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    agreeing, voters = map(int, response.headers["X-Capibara-Tool-Agreement"].split("/"))
    answer = response.json()
    assert 1 <= agreeing <= voters == len([e for e in answer["consensus"]["experts"] if e["ok"]])
    assert answer["consensus"]["method"] == "tool_vote" and answer["choices"][0]["finish_reason"] == "tool_calls"
    assert_valid(answer["choices"][0]["message"]["tool_calls"])
    stats = requests.get(vllm_consensus_server.url + "/stats", timeout=5).json()["consensus"]
    assert stats["tool_votes"] >= 1 and 0 < stats["mean_tool_agreement"] <= 1


def test_the_vote_takes_the_most_proposed_call_and_ties_go_to_the_ranking():
    def proposing(expert: str, name: str, arguments: str) -> Candidate:
        return Candidate(expert, 0.1, tool_calls=({"id": f"call-{expert}", "type": "function",
                                                   "function": {"name": name, "arguments": arguments}},))

    same_a = proposing("a", "get_weather", '{"location": "Madrid", "unit": "celsius"}')
    same_b = proposing("b", "get_weather", '{"unit":"celsius","location":"Madrid"}')  # the same call, reordered
    other = proposing("c", "get_weather", '{"location": "Lima", "unit": "celsius"}')
    assert tool_vote([other, same_a, same_b]) == (same_a, 2)
    assert tool_vote([other, same_a]) == (other, 1), "a tie goes to the better-ranked candidate"
    assert tool_vote([Candidate("d", 0.1, "just text")]) is None


def test_tools_go_to_an_expert_that_can_call_them(tmp_path, start_server, fake_upstream):
    """With no model, a request with tools never lands on an expert without a tool-call parser; naming one is a
    clear 400."""
    path, config = make_config(tmp_path, engine="fake", upstream=fake_upstream.url)
    multilingual = next(e for e in config["experts"] if e["id"] == "aya_expanse_multilingual")
    multilingual["engine"] = {"kind": "vllm", "tool_call_parser": None}  # never started: routing only
    front = start_server("standard", write_config(path, config))
    spanish = [{"role": "user", "content": "¿Qué tiempo hace hoy en Madrid? Responde en español, por favor."}]
    plain = requests.post(front.url + "/v1/route", json={"messages": spanish}, timeout=10).json()
    assert plain["expert"] == "aya_expanse_multilingual"
    routed = requests.post(front.url + "/v1/route", json={"messages": spanish, "tools": TOOLS}, timeout=10).json()
    assert routed["expert"] != "aya_expanse_multilingual" and routed["reason"].startswith("tools:")
    assert routed["stage"] == "rules"
    named = requests.post(front.url + "/v1/chat/completions", json={"model": "aya_expanse_multilingual",
                                                                  "messages": spanish, "tools": TOOLS}, timeout=10)
    assert named.status_code == 400 and named.json()["error"]["code"] == "tools_not_supported"
    assert named.json()["error"]["param"] == "tools"


def test_the_compact_json_patch_still_applies_to_this_vllm():
    """Our patch of vLLM's tool grammar (core/host/compact_tool_json.py): fails when vLLM changes under it."""
    from core.host.compact_tool_json import MAX_WHITESPACE, apply

    assert apply()
    import vllm.tool_parsers.structural_tag_registry as registry

    assert registry.JSONSchemaFormat(json_schema={"type": "object"}).max_whitespace_cnt == MAX_WHITESPACE


def test_the_forced_tool_json_patch_still_applies_to_this_vllm_and_only_to_parsers_it_fits():
    """core/host/forced_tool_json.py: fails when vLLM changes under it; a parser with another envelope is left alone."""
    from core.host.forced_tool_json import apply

    assert apply("hermes")
    assert not apply("mistral")
    from vllm.parser.abstract_parser import DelegatingParser

    assert DelegatingParser._apply_structural_tag.forced_tool_json


def test_a_call_whose_closing_tag_max_tokens_cut_is_still_read():
    """The hermes envelope's `</tool_call>` is spelled token by token and is the last thing max_tokens cuts; a whole
    call before it counts (streamed, the client already had it). Text that merely ends in "<" is left alone."""
    from transformers import AutoTokenizer
    from vllm.tool_parsers import ToolParserManager

    from core.host.forced_tool_json import apply

    assert apply("hermes")
    parser = ToolParserManager.get_tool_parser("hermes")(AutoTokenizer.from_pretrained(FLOAT32_DIR))
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
    for cut in ("</too", "</", "<"):
        found = parser.extract_tool_calls(call + cut, request=None)
        assert found.tools_called and json.loads(found.tool_calls[0].function.arguments) == {"zone": "CET"}, cut
    assert not parser.extract_tool_calls(call[:-4], request=None).tools_called  # the JSON itself cut: no call
    assert parser.extract_tool_calls("1 < 2, and 2 <", request=None).content == "1 < 2, and 2 <"
