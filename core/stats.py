"""Statistics for /stats: per-expert counters and latency percentiles, routing, streams, server uptime.

Every figure is recorded here by the service and the model manager; nothing else keeps counters.
Percentiles come from a bounded window of recent samples, so memory stays flat on a long-running server.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

WINDOW = 2048


class Samples:
    """The most recent WINDOW observations of one quantity."""

    def __init__(self) -> None:
        self._values: deque[float] = deque(maxlen=WINDOW)

    def add(self, value: float) -> None:
        self._values.append(value)

    def percentile(self, q: float) -> float | None:
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]

    def mean(self) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None

    def summary(self, *qs: float, scale: float = 1.0, digits: int = 4) -> dict[str, float | None]:
        out = {}
        for q in qs:
            value = self.percentile(q)
            out[f"p{q:g}"] = None if value is None else round(value * scale, digits)
        return out


@dataclass
class ExpertStats:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    last_load_seconds: float | None = None
    active_streams: int = 0
    latency: Samples = field(default_factory=Samples)
    ttft: Samples = field(default_factory=Samples)
    inter_token: Samples = field(default_factory=Samples)

    def render(self) -> dict:
        tokens_per_s = (self.completion_tokens / self.generation_seconds) if self.generation_seconds else None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
            "latency_s": self.latency.summary(50, 95),
            "ttft_s": self.ttft.summary(50, 95),
            "inter_token_s": self.inter_token.summary(50, 95),
            "active_streams": self.active_streams,
            "loads": self.loads,
            "load_failures": self.load_failures,
            "unloads": self.unloads,
            "last_load_s": None if self.last_load_seconds is None else round(self.last_load_seconds, 3),
        }


class Stats:
    """All counters of one server process."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.started = time.monotonic()
        self.experts: dict[str, ExpertStats] = {}
        self.route_decisions: Counter[str] = Counter()
        self.route_latency = Samples()
        self.client_errors: Counter[int] = Counter()
        self.consensus: dict[str, float] = Counter()
        self.consensus_failures: Counter[str] = Counter()
        self.consensus_fanout = Samples()
        self.consensus_synthesis = Samples()

    def expert(self, expert_id: str) -> ExpertStats:
        stats = self.experts.get(expert_id)
        if stats is None:
            stats = self.experts[expert_id] = ExpertStats()
        return stats

    def record_route(self, expert_id: str, elapsed_ms: float) -> None:
        self.route_decisions[expert_id] += 1
        self.route_latency.add(elapsed_ms)

    def record_client_error(self, status: int) -> None:
        self.client_errors[status] += 1

    def record_generation(self, expert_id: str, *, seconds: float, prompt_tokens: int, completion_tokens: int,
                          ttft: float | None, ok: bool) -> None:
        stats = self.expert(expert_id)
        stats.requests += 1
        if not ok:
            stats.errors += 1
        stats.latency.add(seconds)
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        if ttft is not None and completion_tokens > 0:
            stats.ttft.add(ttft)
            stats.generation_seconds += seconds
            if completion_tokens > 1:
                stats.inter_token.add((seconds - ttft) / (completion_tokens - 1))

    def record_load(self, expert_id: str, seconds: float, ok: bool) -> None:
        stats = self.expert(expert_id)
        if ok:
            stats.loads += 1
            stats.last_load_seconds = seconds
        else:
            stats.load_failures += 1

    def record_unload(self, expert_id: str) -> None:
        self.expert(expert_id).unloads += 1

    def record_consensus(self, experts_used: int, fanout_s: float, synthesis_s: float | None,
                         failed: list[str]) -> None:
        self.consensus["requests"] += 1
        self.consensus["experts_used"] += experts_used
        self.consensus_fanout.add(fanout_s)
        if synthesis_s is not None:
            self.consensus_synthesis.add(synthesis_s)
        for expert_id in failed:
            self.consensus_failures[expert_id] += 1

    def render(self, expert_states: dict[str, dict]) -> dict:
        experts = {}
        for expert_id, state in expert_states.items():
            experts[expert_id] = {**state, **self.expert(expert_id).render()}
        consensus_requests = self.consensus["requests"]
        return {
            "server": self.server,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "experts": experts,
            "active_streams": sum(s.active_streams for s in self.experts.values()),
            "routing": {
                "decisions": dict(self.route_decisions),
                "latency_ms": self.route_latency.summary(50, 99),
            },
            "client_errors": {str(k): v for k, v in sorted(self.client_errors.items())},
            "consensus": {
                "requests": int(consensus_requests),
                "mean_experts_used": (self.consensus["experts_used"] / consensus_requests
                                      if consensus_requests else None),
                "failures": dict(self.consensus_failures),
                "fanout_s": self.consensus_fanout.summary(50, 95),
                "synthesis_s": self.consensus_synthesis.summary(50, 95),
            },
        }
