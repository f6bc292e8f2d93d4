"""Forced tool calls as agents send them: how many give arguments that parse and validate, and take their values
from the question, in four arms: vLLM as it comes (its structural tag has the model spell the whole `<tool_call>`
envelope, under the model's own chat template), engine.forced_tool_json (a call forced to one function, named or
"required" with one tool, written as the arguments' JSON under the function's schema), and that with our chat
template (engine.chat_template), which lists the tools the model's own drops; and that with the expert's
tool_call_frequency_penalty (the default), which breaks loops inside a string argument.

Each arm has its own host and standard front; the same terse prompts (a named choice among three tools, "required"
with the one tool that fits, "required" among the three; the expert's own sampling and temperature 0) go through
each in alternating rounds. Prints, per arm, the share of answers with valid calls, the share whose first string
argument is a word of the prompt (a call that names "Paris" when asked about Paris), and the median latency; then
the last arm against the first.

    .venv/bin/python -m bench.bench_tool_calls [--rounds 4] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import jsonschema

from bench.suite import bench_config, fronts, wait_ready

EXPERT = "qwen_coder"
NO_PENALTY = {"tool_call_frequency_penalty": 0.0}
ARMS = {"structural tag": ({"forced_tool_json": False, "chat_template": None}, NO_PENALTY),  # (engine, sampling)
        "forced tool JSON": ({"chat_template": None}, NO_PENALTY), "+ tools listed": ({}, NO_PENALTY),
        "+ freq. penalty": ({}, {})}


def tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [tool("get_weather", "Current weather for a city",
              {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
         tool("get_time", "Current time in a time zone or city", {"zone": {"type": "string"}}, ["zone"]),
         tool("search_web", "Search the web", {"query": {"type": "string"},
                                               "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, ["query"])]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [("Weather in Paris?", "get_weather"), ("is it raining in tokyo", "get_weather"),
           ("What time is it in Berlin?", "get_time"), ("time in Sydney pls", "get_time"),
           ("find me recent papers on mixture of experts", "search_web"), ("look up capybara lifespan", "search_web")]

CHOICES = {"named": lambda name: {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": name}}},
           "required, 1": lambda name: {"tools": [t for t in TOOLS if t["function"]["name"] == name],
                                        "tool_choice": "required"},
           "required, 3": lambda name: {"tools": TOOLS, "tool_choice": "required"}}


def outcome(answer: dict, prompt: str) -> tuple[bool, bool]:
    """(valid: calls whose arguments parse and validate; grounded: the first string argument is in the prompt)."""
    calls = answer["choices"][0]["message"].get("tool_calls") or []
    try:
        arguments = [json.loads(c["function"]["arguments"]) for c in calls]
        for call, args in zip(calls, arguments):
            jsonschema.validate(args, SCHEMAS[call["function"]["name"]])
    except (ValueError, KeyError, jsonschema.ValidationError):
        return False, False
    strings = [v for v in arguments[0].values() if isinstance(v, str)] if arguments else []
    grounded = bool(strings) and any(word in prompt.lower() for word in strings[0].lower().split())
    return bool(calls), grounded


async def ask(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[dict, float]:
    started = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        answer = await response.json()
    return answer, time.monotonic() - started


async def compare(urls: dict[str, str], rounds: int, max_tokens: int) -> None:
    results = {(arm, choice, sampling): [] for arm in urls for choice in CHOICES
               for sampling in ("default", "temperature 0")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(rounds):
            for (arm, choice, sampling), rows in results.items():
                for prompt, name in PROMPTS:
                    body = {"model": EXPERT, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, **CHOICES[choice](name)}
                    if sampling == "temperature 0":
                        body["temperature"] = 0
                    answer, seconds = await ask(session, urls[arm], body)
                    rows.append((*outcome(answer, prompt), seconds))
    print(f"{rounds} rounds x {len(PROMPTS)} prompts, max_tokens {max_tokens}")
    print(f"{'arm':>18}{'choice':>14}{'sampling':>15}{'valid':>8}{'grounded':>10}{'median s':>10}")
    for (arm, choice, sampling), rows in results.items():
        print(f"{arm:>18}{choice:>14}{sampling:>15}{sum(r[0] for r in rows) / len(rows):>8.0%}"
              f"{sum(r[1] for r in rows) / len(rows):>10.0%}{statistics.median(r[2] for r in rows):>10.2f}")
    base, *_, ours = urls
    for choice in CHOICES:
        for sampling in ("default", "temperature 0"):
            a, b = results[(base, choice, sampling)], results[(ours, choice, sampling)]
            ratio = statistics.median(r[2] for r in b) / statistics.median(r[2] for r in a)
            print(f"{choice:>13} {sampling:>13}: valid {sum(r[0] for r in b)}/{len(b)} vs {sum(r[0] for r in a)}/"
                  f"{len(a)}; median latency ratio {ratio:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        urls = {}
        with ExitStack() as stack:
            for arm, (engine, sampling) in ARMS.items():  # one at a time, so neither start slows the other
                config = bench_config(directory, warmup=[EXPERT], experts=[EXPERT], engine=engine,
                                      sampling=sampling, name=f"{len(urls)}.json")
                logs = config.with_suffix("")
                logs.mkdir()
                (front,) = stack.enter_context(fronts(config, ("standard",), log_dir=logs))
                await wait_ready(front.url, [EXPERT], timeout=900)
                urls[arm] = front.url
            await compare(urls, args.rounds, args.max_tokens)


if __name__ == "__main__":
    asyncio.run(main())
