"""Statistics for /stats (JSON) and /metrics (Prometheus): one recording point, two renderings.

Every figure is recorded here by the service and the model manager; nothing else keeps counters.
Percentiles come from a bounded window of recent samples, so memory stays flat on a long-running server.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, generate_latest

WINDOW = 2048
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Prometheus instruments of one server, in their own registry (standard names, `capibara_` prefix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter("capibara_requests", "Generation requests by expert and outcome",
                                    ["expert", "outcome"], registry=r)
        self.http_errors = PromCounter("capibara_http_errors", "Error responses (and error events in streams) by "
                                       "HTTP status", ["status"], registry=r)
        self.latency = Histogram("capibara_request_latency_seconds", "Generation latency", ["expert"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("capibara_time_to_first_token_seconds", "Time to first token", ["expert"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = PromCounter("capibara_tokens", "Tokens processed", ["expert", "kind"], registry=r)
        # Loads happen in the model host; each front reports the host's counts at scrape time.
        self.loads = Gauge("capibara_expert_loads", "Runner starts of the expert's runner by outcome, since the model "
                           "host started", ["expert", "outcome"], registry=r)
        self.unloads = Gauge("capibara_expert_unloads", "Idle or manual unloads of the expert's runner", ["expert"],
                             registry=r)
        self.routes = PromCounter("capibara_route_decisions", "Router decisions by chosen expert", ["expert"],
                                  registry=r)
        self.loaded = Gauge("capibara_loaded_experts", "Experts loaded now", registry=r)
        self.queue = Gauge("capibara_queue_depth", "Requests waiting for an expert slot", ["expert"], registry=r)
        self.active = Gauge("capibara_active_requests", "Requests being served", ["expert"], registry=r)
        self.streams = Gauge("capibara_active_streams", "SSE streams open", registry=r)


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
        }


class Stats:
    """All counters of one server process."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.started = time.monotonic()
        self.experts: dict[str, ExpertStats] = {}
        self.route_decisions: Counter[str] = Counter()
        self.route_latency = Samples()
        self.http_errors: Counter[int] = Counter()
        self.consensus_requests = 0
        self.consensus_experts_used = 0
        self.consensus_failures: Counter[str] = Counter()
        self.consensus_fanout = Samples()
        self.consensus_synthesis = Samples()
        self.tool_votes = 0  # consensus answers that were a tool call chosen by vote
        self.tool_vote_agreement = 0.0  # the sum of each vote's share of candidates that proposed the winner
        self.metrics = Metrics()

    def expert(self, expert_id: str) -> ExpertStats:
        stats = self.experts.get(expert_id)
        if stats is None:
            stats = self.experts[expert_id] = ExpertStats()
        return stats

    def record_route(self, expert_id: str, elapsed_ms: float) -> None:
        self.route_decisions[expert_id] += 1
        self.route_latency.add(elapsed_ms)
        self.metrics.routes.labels(expert_id).inc()

    def record_http_error(self, status: int) -> None:
        self.http_errors[status] += 1
        self.metrics.http_errors.labels(str(status)).inc()

    def record_generation(self, expert_id: str, *, seconds: float, prompt_tokens: int, completion_tokens: int,
                          ttft: float | None, ok: bool) -> None:
        stats = self.expert(expert_id)
        stats.requests += 1
        if not ok:
            stats.errors += 1
        stats.latency.add(seconds)
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        metrics = self.metrics
        metrics.requests.labels(expert_id, "ok" if ok else "error").inc()
        metrics.latency.labels(expert_id).observe(seconds)
        metrics.tokens.labels(expert_id, "prompt").inc(prompt_tokens)
        metrics.tokens.labels(expert_id, "completion").inc(completion_tokens)
        if ttft is not None and completion_tokens > 0:
            metrics.ttft.labels(expert_id).observe(ttft)
            stats.ttft.add(ttft)
            stats.generation_seconds += seconds
            if completion_tokens > 1:
                stats.inter_token.add((seconds - ttft) / (completion_tokens - 1))

    def record_tool_vote(self, agreeing: int, voters: int) -> None:
        self.tool_votes += 1
        self.tool_vote_agreement += agreeing / voters

    def record_consensus(self, experts_used: int, fanout_s: float, synthesis_s: float | None,
                         failed: list[str]) -> None:
        self.consensus_requests += 1
        self.consensus_experts_used += experts_used
        self.consensus_fanout.add(fanout_s)
        if synthesis_s is not None:
            self.consensus_synthesis.add(synthesis_s)
        for expert_id in failed:
            self.consensus_failures[expert_id] += 1

    def render(self, expert_states: dict[str, dict]) -> dict:
        experts = {}
        for expert_id, state in expert_states.items():
            experts[expert_id] = {**state, **self.expert(expert_id).render()}
        return {
            "server": self.server,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "experts": experts,
            "active_streams": sum(s.active_streams for s in self.experts.values()),
            "routing": {
                "decisions": dict(self.route_decisions),
                "latency_ms": self.route_latency.summary(50, 99),
            },
            "http_errors": {str(k): v for k, v in sorted(self.http_errors.items())},
            "consensus": {
                "requests": self.consensus_requests,
                "mean_experts_used": (self.consensus_experts_used / self.consensus_requests
                                      if self.consensus_requests else None),
                "failures": dict(self.consensus_failures),
                "fanout_s": self.consensus_fanout.summary(50, 95),
                "synthesis_s": self.consensus_synthesis.summary(50, 95),
                "tool_votes": self.tool_votes,
                "mean_tool_agreement": self.tool_vote_agreement / self.tool_votes if self.tool_votes else None,
            },
        }

    def render_metrics(self, expert_states: dict[str, dict]) -> bytes:
        """Prometheus text format; gauges are read from the live expert states at scrape time."""
        metrics = self.metrics
        metrics.loaded.set(sum(1 for state in expert_states.values() if state["state"] == "ready"))
        for expert_id, state in expert_states.items():
            metrics.queue.labels(expert_id).set(state["queued_requests"])
            metrics.active.labels(expert_id).set(state["active_requests"])
            metrics.loads.labels(expert_id, "ok").set(state["loads"])
            metrics.loads.labels(expert_id, "failed").set(state["load_failures"])
            metrics.unloads.labels(expert_id).set(state["unloads"])
        metrics.streams.set(sum(s.active_streams for s in self.experts.values()))
        return generate_latest(metrics.registry)
