"""Token limits: no request asks an expert for more than server.max_tokens, on any port, in any field; consensus
candidates stay within candidate_max_tokens whichever field the client used; a config whose defaults exceed the
cap does not start.

Real fronts on the fake upstream: an over-the-cap request is refused before any runner is involved, and what
passes is read back from the bodies the upstream received.
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest
import requests

from core.config import ConfigError, parse_config
from core.front.consensus import SYNTHESIS_PROMPT
from tests.conftest import EMBEDDED, make_config, write_config

CAP = 1000  # over every default of configs/embedded.json (512 at most)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def capped_config(tmp_path_factory, fake_upstream) -> Path:
    path, config = make_config(tmp_path_factory.mktemp("limits"), engine="fake", upstream=fake_upstream.url,
                               max_tokens=CAP)
    config["consensus"]["candidate_max_tokens"] = 5
    return write_config(path, config)


@pytest.mark.parametrize("kind", ["standard", "streaming", "consensus"])
def test_every_token_limit_over_the_cap_is_a_400_naming_it(kind, capped_config, start_server, fake_upstream):
    server = start_server(kind, capped_config)
    seen = len(fake_upstream.requests())
    user = [{"role": "user", "content": "hello"}]
    over = [(CHAT, {"messages": user, "max_tokens": CAP + 1}, "max_tokens"),
            (CHAT, {"messages": user, "max_completion_tokens": CAP + 1}, "max_completion_tokens"),
            (CHAT, {"messages": user, "min_tokens": CAP + 1, "stream": True}, "min_tokens"),
            (CHAT, {"messages": user, "max_tokens": 1 << 40}, "max_tokens"),
            (COMPLETIONS, {"prompt": "hello", "max_tokens": CAP + 1}, "max_tokens"),
            (COMPLETIONS, {"prompt": "hello", "min_tokens": CAP + 1}, "min_tokens")]
    for path, body, field in over:
        response = requests.post(server.url + path, json=body, timeout=10)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert len(fake_upstream.requests()) == seen  # refused before any upstream saw them
    marker = uuid.uuid4().hex
    at_cap = requests.post(server.url + CHAT, timeout=30, json={
        "model": "phi4_fast", "messages": [{"role": "user", "content": marker}], "max_tokens": CAP})
    assert at_cap.status_code == 200, at_cap.text


def test_consensus_candidates_are_capped_whichever_field_the_client_used(capped_config, start_server,
                                                                          fake_upstream):
    """vLLM reads max_completion_tokens before max_tokens: both, and min_tokens, are capped for each candidate;
    the synthesis keeps the client's own (within server.max_tokens)."""
    server = start_server("consensus", capped_config)
    marker = uuid.uuid4().hex
    response = requests.post(server.url + CHAT, timeout=60, json={
        "messages": [{"role": "user", "content": f"Explain recursion with an example {marker}"}],
        "max_tokens": 300, "max_completion_tokens": 200, "min_tokens": 2})
    assert response.status_code == 200, response.text
    bodies = [r["body"] for r in fake_upstream.requests() if "messages" in r["body"]
              and marker in str(r["body"]["messages"][-1])]
    synthesis = [b for b in bodies if SYNTHESIS_PROMPT in str(b["messages"][0]["content"])]
    candidates = [b for b in bodies if b not in synthesis]
    assert len(candidates) == 3 and len(synthesis) == 1, bodies
    for body in candidates:
        assert (body["max_tokens"], body["max_completion_tokens"], body["min_tokens"]) == (5, 5, 2), body
    assert (synthesis[0]["max_tokens"], synthesis[0]["max_completion_tokens"]) == (300, 200)


def test_a_config_whose_defaults_exceed_the_cap_is_refused():
    config = copy.deepcopy(EMBEDDED)
    config["server"]["max_tokens"] = 300
    with pytest.raises(ConfigError, match=r"experts\.1\.sampling\.max_tokens: 384 is over server\.max_tokens"):
        parse_config(config, Path("."))
    config = copy.deepcopy(EMBEDDED)
    config["server"]["max_tokens"] = 600
    config["consensus"]["candidate_max_tokens"] = 601
    with pytest.raises(ConfigError, match=r"consensus\.candidate_max_tokens: 601 is over server\.max_tokens"):
        parse_config(config, Path("."))
