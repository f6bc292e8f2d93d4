"""What the three latency tools share: the statistics, the result files and the charts.

A results file always keeps its raw samples, and every figure is recomputed from them here, so a
single run's report and a before/after comparison can never disagree about how a number was made.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_FORMAT = "capibara6-latency/1"
COLOURS = ("#8c6d4f", "#2a9d8f")  # before/after (or a single run): capybara brown, teal


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    lower_is_better: bool

    @property
    def header(self) -> str:
        return f"{self.label} (s)" if self.unit == "s" else self.label


METRICS = (
    Metric("latency_mean_s", "mean latency", "s", True),
    Metric("latency_std_s", "latency std", "s", True),
    Metric("latency_p50_s", "p50 latency", "s", True),
    Metric("latency_p95_s", "p95 latency", "s", True),
    Metric("ttft_p50_s", "p50 time to first token", "s", True),
    Metric("tokens_per_s", "tokens/s", "tok/s", False),
    Metric("error_rate", "error rate", "%", True),
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), defined for one value too."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarise_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Figures for one group of samples; tokens/s is all tokens over all generation time, so short
    answers do not inflate it."""
    ok = [s for s in samples if s["ok"]]
    latencies = [s["latency_s"] for s in ok]
    ttfts = [s["ttft_s"] for s in ok if s["ttft_s"] is not None]
    tokens = sum(s["completion_tokens"] for s in ok)
    busy = sum(latencies)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_rate": _round((len(samples) - len(ok)) / len(samples)) if samples else None,
        "latency_mean_s": _round(statistics.fmean(latencies)) if latencies else None,
        "latency_std_s": _round(statistics.stdev(latencies)) if len(latencies) > 1 else None,
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p95_s": _round(percentile(latencies, 95)),
        "latency_min_s": _round(min(latencies, default=None)),
        "latency_max_s": _round(max(latencies, default=None)),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p95_s": _round(percentile(ttfts, 95)),
        "completion_tokens": tokens,
        "tokens_per_s": _round(tokens / busy, 2) if busy > 0 else None,
    }


def summarise(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    models: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        models.setdefault(sample["model"], []).append(sample)
    return {"overall": summarise_samples(samples),
            "models": {model: summarise_samples(group) for model, group in models.items()}}


def default_out_dir(prefix: str) -> Path:
    """Where a tool writes when --out is not given: a new folder per run, so nothing is overwritten."""
    return Path("results") / datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")


def write_json(path: Path, data: Any) -> Path:
    """Strict JSON (no NaN/Infinity), so any consumer can read it."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def load_results(path: Path) -> dict[str, Any]:
    """A results file written by test_latency_safe, with its summary recomputed from the samples."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a capibara6 latency results file (format {RESULTS_FORMAT})")
    data["summary"] = summarise(data["samples"])
    return data


def fmt(value: float | None, unit: str) -> str:
    """A table cell: seconds to the millisecond, rates as percentages, tokens/s to two places."""
    if value is None:
        return "–"
    if unit == "%":
        return f"{value:.1%}"
    return f"{value:.3f}" if unit == "s" else f"{value:.2f}"


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _short(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def bar_chart(path: Path, title: str, ylabel: str, groups: Sequence[str], series: dict[str, Sequence[float | None]],
              errors: dict[str, Sequence[float | None]] | None = None) -> Path:
    """Grouped bars (one bar per series in each group) with their values written on them; a missing
    value is labelled n/a, so it cannot be mistaken for a measured zero."""
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * len(series)), 4.5))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        spread = [e or 0.0 for e in errors[label]] if errors else None
        bars = axes.bar(xs, heights, width, yerr=spread, capsize=4, label=label,
                        color=COLOURS[offset % len(COLOURS)])
        axes.bar_label(bars, labels=["n/a" if v is None else _short(v) for v in values], fontsize=8, padding=2)
    axes.set_xticks(range(len(groups)), groups, rotation=15 if len(groups) > 3 else 0)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return save_figure(figure, path)


def box_chart(path: Path, title: str, ylabel: str, data: dict[str, Sequence[float]]) -> Path:
    """Distribution per group: the box shows p25-p75 and the median, the triangle the mean, so
    a stall (one huge outlier) is visible at a glance."""
    labels = [label for label, values in data.items() if values]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(data)), 4.5))
    if labels:
        axes.boxplot([data[label] for label in labels], tick_labels=labels, showmeans=True)
    else:
        axes.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=axes.transAxes)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)
