"""What vLLM's server supports reaches clients through every front: the OpenAI Python client on the standard,
streaming and consensus ports, on the real engine (the session's one runner), asks for JSON by schema, logprobs
and a forced tool call, and gets them in OpenAI's shape; a field nobody supports is a 400, never silence."""
import json

import jsonschema
import openai
import pytest

QUESTION = [{"role": "user", "content": "Give me the name and age of a fictional capybara."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module", params=["standard", "streaming", "consensus"])
def client(request, real_engine):  # named, as the server fixture is only looked up by name below
    server = request.getfixturevalue({"standard": "vllm_server", "streaming": "vllm_streaming_server",
                                      "consensus": "vllm_consensus_server"}[request.param])
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_answers_validate(client):
    response = client.chat.completions.create(
        model="phi4_fast", messages=QUESTION, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capybara", "schema": SCHEMA}})
    assert response.model == "phi4_fast"
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)


def test_logprobs_come_back(client):
    response = client.chat.completions.create(model="phi4_fast", messages=QUESTION, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2)
    tokens = response.choices[0].logprobs.content
    assert len(tokens) == response.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    assert "".join(t.token for t in tokens) == response.choices[0].message.content


def test_a_forced_tool_choice_returns_a_tool_call(client):
    """OpenAI's shape, and arguments held to the tool's schema (engine.tool_strict_level; test_tools has the rest)."""
    response = client.chat.completions.create(
        model="qwen_coder", messages=[{"role": "user", "content": "What is the weather in Lima?"}], max_tokens=60,
        temperature=0, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = response.choices[0].message.tool_calls
    assert response.model == "qwen_coder" and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_streamed_logprobs_and_usage(client):
    chunks = list(client.chat.completions.create(
        model="phi4_fast", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, stream=True,
        stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    assert sum(len(c.choices[0].logprobs.content) for c in content) == chunks[-1].usage.completion_tokens == 6


def test_an_unsupported_field_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="phi4_fast", messages=QUESTION, max_tokens=4,
                                       extra_body={"web_search_options": {}})
    assert error.value.body["param"] == "web_search_options"
    assert error.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="phi4_fast", prompt="Hello", max_tokens=4, suffix="!")


def test_vllm_sampling_extras_reach_the_engine(client):
    response = client.completions.create(model="phi4_fast", prompt="Once upon a time", max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "min_tokens": 12})
    assert response.usage.completion_tokens == 12 and response.choices[0].finish_reason == "length"
