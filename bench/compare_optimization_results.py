"""Compare two latency results files (before and after an optimisation): mean, std, p50/p95,
time to first token, tokens/s and error rate, each with its change in %, overall and per model.

The figures are recomputed from each file's raw samples (bench.reporting), so two files written
at different times are compared by the same rules. Writes comparison.json, comparison.md and charts.

    python bench/compare_optimization_results.py before/latency.json after/latency.json --out results/cmp
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reporting import (METRICS, bar_chart, default_out_dir, fmt, load_results, markdown_table, plt, save_figure,
                             write_json, write_markdown)

COMPARISON_FORMAT = "capibara6-comparison/1"


def change_pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return round((after - before) / abs(before) * 100.0, 1)


def _compare_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for metric in METRICS:
        old, new = before.get(metric.key), after.get(metric.key)
        change = change_pct(old, new)
        better = None if change is None or change == 0 else (change < 0) == metric.lower_is_better
        rows[metric.key] = {"before": old, "after": new, "change_pct": change, "better": better}
    rows["errors"] = {"before": before.get("errors"), "after": after.get("errors")}
    return rows


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Both runs' summaries side by side; a model only one side measured still gets a row."""
    labels = [before["label"], after["label"]]
    if labels[0] == labels[1]:  # the same URL twice: keep the charts' legends apart
        labels = [f"{labels[0]} (before)", f"{labels[1]} (after)"]
    old, new = before["summary"], after["summary"]
    models = list(dict.fromkeys([*old["models"], *new["models"]]))
    return {
        "format": COMPARISON_FORMAT,
        "before": {"label": labels[0], "url": before.get("url"), "started_at": before.get("started_at")},
        "after": {"label": labels[1], "url": after.get("url"), "started_at": after.get("started_at")},
        "overall": _compare_figures(old["overall"], new["overall"]),
        "models": {m: _compare_figures(old["models"].get(m, {}), new["models"].get(m, {})) for m in models},
    }


def _change(row: dict[str, Any]) -> str:
    if row["change_pct"] is None:
        return "–"
    verdict = "" if row["better"] is None else " (better)" if row["better"] else " (worse)"
    return f"{row['change_pct']:+.1f}%{verdict}"


def _cell(row: dict[str, Any], unit: str) -> str:
    text = f"{fmt(row['before'], unit)} → {fmt(row['after'], unit)}"
    return text if row["change_pct"] is None else f"{text}: {_change(row)}"


def summary_line(comparison: dict[str, Any]) -> str:
    overall = comparison["overall"]
    return ", ".join(f"{m.label} {_cell(overall[m.key], m.unit)}"
                     for m in METRICS if m.key in ("latency_mean_s", "latency_std_s", "tokens_per_s"))


def change_chart(path: Path, title: str, rows: dict[str, Any]) -> Path:
    """Overall change per metric, green where the after run is better: the one-glance verdict."""
    shown = [(m, rows[m.key]) for m in METRICS if rows[m.key]["change_pct"] is not None]
    figure, axes = plt.subplots(figsize=(7.5, 0.55 * max(len(shown), 1) + 1.6))
    if shown:
        names = [m.label for m, _ in shown]
        changes = [row["change_pct"] for _, row in shown]
        colours = ["#2a9d8f" if row["better"] else "#c0392b" if row["better"] is False else "#999999"
                   for _, row in shown]
        bars = axes.barh(names, changes, color=colours)
        axes.bar_label(bars, labels=[f"{c:+.1f}%" for c in changes], fontsize=8, padding=3)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.invert_yaxis()
        axes.margins(x=0.2)
    else:
        axes.text(0.5, 0.5, "nothing comparable", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("change after vs before (%); green = better")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def write_comparison(comparison: dict[str, Any], out_dir: Path, stem: str = "comparison") -> list[Path]:
    """<stem>.json, <stem>.md and three charts: latency, tokens/s, and the change per metric."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before, after = comparison["before"]["label"], comparison["after"]["label"]
    groups = {**comparison["models"], "all": comparison["overall"]}

    def series(key: str) -> dict[str, list[float | None]]:
        return {before: [g[key]["before"] for g in groups.values()], after: [g[key]["after"] for g in groups.values()]}

    charts = [
        bar_chart(out_dir / f"{stem}_latency.png", "Mean latency (error bars: std)", "seconds", list(groups),
                  series("latency_mean_s"), errors=series("latency_std_s")),
        bar_chart(out_dir / f"{stem}_throughput.png", "Generation speed", "tokens/s", list(groups),
                  series("tokens_per_s")),
        change_chart(out_dir / f"{stem}_change.png", f"{before} → {after}", comparison["overall"]),
    ]
    overall = comparison["overall"]
    lines = [f"# Before/after: {before} → {after}", "",
             f"Before: {comparison['before']['url']} ({comparison['before']['started_at']}); "
             f"after: {comparison['after']['url']} ({comparison['after']['started_at']}). "
             f"Requests failed: {overall['errors']['before']} before, {overall['errors']['after']} after.", "",
             markdown_table(["metric", "before", "after", "change"],
                            [[m.header, fmt(overall[m.key]["before"], m.unit), fmt(overall[m.key]["after"], m.unit),
                              _change(overall[m.key])] for m in METRICS]), ""]
    lines += [f"![{chart.stem}]({chart.name})" for chart in charts] + ["", "## Per model", ""]
    per_model = [m for m in METRICS if m.key in ("latency_mean_s", "latency_p95_s", "ttft_p50_s", "tokens_per_s")]
    lines.append(markdown_table(["model", *(m.header for m in per_model), "errors"],
                                [[model, *(_cell(rows[m.key], m.unit) for m in per_model),
                                  f"{rows['errors']['before']} → {rows['errors']['after']}"]
                                 for model, rows in comparison["models"].items()]))
    return [write_json(out_dir / f"{stem}.json", comparison), write_markdown(out_dir / f"{stem}.md", lines), *charts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="results file of the run before the change")
    parser.add_argument("after", type=Path, help="results file of the run after the change")
    parser.add_argument("--labels", nargs=2, metavar=("BEFORE", "AFTER"), help="names in the report")
    parser.add_argument("--out", type=Path, default=default_out_dir("comparison"))
    args = parser.parse_args(argv)
    try:
        runs = [load_results(args.before), load_results(args.after)]
    except (OSError, ValueError, KeyError) as error:
        parser.exit(1, f"cannot read the results: {error}\n")
    for run, label in zip(runs, args.labels or ()):
        run["label"] = label
    comparison = compare(*runs)
    files = write_comparison(comparison, args.out)
    print(summary_line(comparison))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
