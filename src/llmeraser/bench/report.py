"""Benchmark results: aggregation over seeds, the paper-style table, the targets, and the files written.

``summarise`` turns the per-seed rows into mean ± std (over seeds, ddof 0) per ratio, method and metric;
``check_targets`` compares LLMEraser with Retrain and the corrupted model as the benchmark issue asks;
``write_results`` writes ``results.json``, ``results.md`` and the PNG plots into one folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmeraser.jsonl import write_text_atomic

METRICS: tuple[tuple[str, str, str], ...] = (
    ("test_auc", "test AUC", ".4f"),
    ("loss_old", "loss edited (old)", ".4f"),
    ("loss_new", "loss edited (new)", ".4f"),
    ("accuracy_new", "acc. edited (new)", ".3f"),
    ("mia_auc", "MIA AUC", ".3f"),
    ("kl_test", "KL→retrain test", ".2e"),
    ("kl_edited", "KL→retrain edited", ".2e"),
    ("seconds", "time (s)", ".1f"),
    ("peak_rss_mib", "peak RSS (MiB)", ".0f"),
)
PII_METRICS: tuple[tuple[str, str, str], ...] = (
    ("extract_removed", "extraction (removed)", ".3f"),
    ("loglik_removed", "log-lik. removed", ".3f"),
    ("mia_auc", "MIA AUC", ".3f"),
    ("corrected_rate", "says corrected", ".3f"),
    ("old_value_rate", "says old value", ".3f"),
    ("extract_kept", "extraction (kept)", ".3f"),
    ("kl_test", "KL→retrain kept", ".2e"),
    ("kl_edited", "KL→retrain edited", ".2e"),
    ("seconds", "time (s)", ".1f"),
    ("peak_rss_mib", "peak RSS (MiB)", ".0f"),
)


def metric_columns(task: str) -> tuple[tuple[str, str, str], ...]:
    """(key, title, format) of the table's metric columns for ``task``."""
    return PII_METRICS if task == "pii" else METRICS


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, title, format spec); floats are formatted, others str()."""
    header = [title for _, title, _ in columns]
    body = [
        [format(row[key], fmt) if isinstance(row.get(key), float) else str(row.get(key, "")) for key, _, fmt in columns]
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """``{ratio: {"methods": {method: {metric: {mean, std, n}}}, "spread": {kl_test, kl_edited}}}``."""
    summary: dict[str, Any] = {}
    columns = metric_columns(results["config"]["task"])
    for ratio in sorted({row["ratio"] for row in results["rows"]}):
        rows = [row for row in results["rows"] if row["ratio"] == ratio]
        methods: dict[str, Any] = {}
        for method in dict.fromkeys(row["method"] for row in rows):
            mine = [row for row in rows if row["method"] == method]
            methods[method] = {key: _mean_std([row.get(key, float("nan")) for row in mine]) for key, _, _ in columns}
        spread_rows = [row for row in results["spread"] if row["ratio"] == ratio]
        spread = {key: _mean_std([row[key] for row in spread_rows]) for key in ("kl_test", "kl_edited")}
        summary[str(ratio)] = {"methods": methods, "spread": spread}
    return summary


ERASERS = ("llmeraser", "llmeraser_cached")


def check_targets(task: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark issue's targets per ratio and LLMEraser variant, each with the measured value and
    whether it is met (means over seeds)."""
    targets = []
    for ratio, block in summary.items():
        mean = {m: {k: v["mean"] for k, v in metrics.items()} for m, metrics in block["methods"].items()}
        if task == "pii" or "retrain" not in mean:
            continue
        retrain, original = mean["retrain"], mean["original"]
        spread = block["spread"]["kl_test"]["mean"]
        for name in (n for n in ERASERS if n in mean):
            eraser = mean[name]
            if task == "removal":
                gap = abs(eraser["test_auc"] - retrain["test_auc"])
                targets.append({"ratio": ratio, "target": f"{name}: test AUC within 0.01 of Retrain", "value": gap,
                                "met": bool(gap <= 0.01)})
            else:
                gain = retrain["test_auc"] - original["test_auc"]
                recovered = (eraser["test_auc"] - original["test_auc"]) / gain if gain > 0 else float("nan")
                targets.append({"ratio": ratio, "target": f"{name}: recovers ≥ 80 % of Retrain's AUC gain over the corrupted model",
                                "value": recovered, "met": bool(gain > 0 and recovered >= 0.8),
                                "note": "" if gain > 0 else f"Retrain does not gain AUC over the corrupted model ({gain:+.4f})"})
            targets.append({"ratio": ratio, "target": f"{name}: KL to Retrain (test) ≤ retrain-vs-retrain spread",
                            "value": eraser["kl_test"], "threshold": spread,
                            "met": bool(not math.isnan(spread) and eraser["kl_test"] <= spread)})
            ratio_time = eraser["seconds"] / retrain["seconds"]
            targets.append({"ratio": ratio, "target": f"{name}: erase time ≤ 1/5 of retrain time", "value": ratio_time,
                            "met": bool(ratio_time <= 0.2)})
    return targets


def _cell(stats: dict[str, float], fmt: str) -> str:
    if stats["n"] == 0:
        return "–"
    text = format(stats["mean"], fmt)
    return f"{text} ± {format(stats['std'], fmt)}" if stats["n"] > 1 else text


def summary_rows(summary: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per ratio, the table rows (one per method, then the retrain-vs-retrain spread) as formatted text."""
    tables = []
    for ratio, block in summary.items():
        rows = [{"method": method, **{key: _cell(stats[key], fmt) for key, _, fmt in columns}}
                for method, stats in block["methods"].items()]
        spread = block["spread"]
        if spread["kl_test"]["n"]:
            rows.append({"method": "retrain vs retrain (seeds)", **{key: "" for key, _, _ in columns},
                         "kl_test": _cell(spread["kl_test"], ".2e"), "kl_edited": _cell(spread["kl_edited"], ".2e")})
        tables.append((ratio, rows))
    return tables


def render_text(results: dict[str, Any]) -> str:
    """The paper-style table(s) and the targets, as printed on the terminal."""
    metrics = metric_columns(results["config"]["task"])
    columns = [("method", "method", ""), *metrics]
    lines = []
    for ratio, rows in summary_rows(results["summary"], metrics):
        present = [c for c in columns if any(row.get(c[0]) not in ("", "–") for row in rows)]
        lines += [f"task {results['config']['task']}, ratio {ratio} ({results['requests'][ratio]} requests), "
                  f"mean ± std over {len(results['config']['seeds'])} seed(s)", format_table(rows, present), ""]
    for target in results["targets"]:
        lines.append(f"[{'met' if target['met'] else 'NOT met'}] ratio {target['ratio']}: {target['target']}: "
                     f"{target['value']:.4g}" + (f" (threshold {target['threshold']:.4g})" if "threshold" in target else "")
                     + (f" — {target['note']}" if target.get("note") else ""))
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: command, machine, the table per ratio, targets, and what each column means."""
    metrics = metric_columns(results["config"]["task"])
    columns = [("method", "method"), *((key, title) for key, title, _ in metrics)]
    out = [f"# llmeraser bench — task `{results['config']['task']}`", "",
           f"Command: `{results['command']}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), ""]
    for ratio, rows in summary_rows(results["summary"], metrics):
        present = [c for c in columns if any(row.get(c[0]) not in ("", "–") for row in rows)]
        out += [f"## ratio {ratio} ({results['requests'][ratio]} requests; mean ± std over seeds "
                f"{', '.join(map(str, results['config']['seeds']))})", "",
                "| " + " | ".join(title for _, title in present) + " |",
                "|" + "---|" * len(present)]
        out += ["| " + " | ".join(str(row.get(key, "")) for key, _ in present) + " |" for row in rows]
        out.append("")
    out += ["## Targets", ""]
    for target in results["targets"]:
        threshold = f" (threshold {target['threshold']:.4g})" if "threshold" in target else ""
        note = f" — {target['note']}" if target.get("note") else ""
        out.append(f"- {'met' if target['met'] else '**not met**'}: ratio {target['ratio']}, {target['target']}: "
                   f"{target['value']:.4g}{threshold}{note}")
    for entry in results.get("caches", []):
        out.append(f"- llmeraser_cached (ratio {entry['ratio']}, seed {entry['seed']}): {entry['method']} fitted once in "
                   f"{entry['fit']['seconds']:.0f} s (with the step-length calibration, α = {entry['step_length']:.3g}; "
                   f"calibration residuals {', '.join(f'{r:.2f}' for r in entry['calibration_residuals'])})")
    for entry in results.get("sisa", []):
        out.append(f"- SISA (ratio {entry['ratio']}, seed {entry['seed']}): {entry['affected_shards']} of "
                   f"{entry['shards']} shards retrained; initial shard training {entry['initial_training']['seconds']:.0f} s")
    out += ["", "Columns: time is the method's own cost (training for original/retrain, the erase call, the "
            "baseline's update, SISA's retraining of the affected shards); peak RSS is the process's resident "
            "memory during it. KL→retrain is KL(retrain ‖ method) per response token; the last row is the same "
            "distance between the retrained models of two seeds. MIA AUC: loss-based membership inference of "
            "the edited examples' old versions against never-trained examples (0.5 = indistinguishable).", ""]
    return "\n".join(out)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """metrics_vs_ratio.png, solver_residual.png, time_per_method.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    ratios = [float(r) for r in summary]
    methods = list(dict.fromkeys(m for block in summary.values() for m in block["methods"]))
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    first = ("extract_removed", "extraction rate (removed people)") if results["config"]["task"] == "pii" else ("test_auc", "test AUC")
    for ax, (key, title) in zip(axes, (first, ("kl_test", "KL to retrain (test)"), ("mia_auc", "MIA AUC"))):
        for method in methods:
            stats = [summary[r]["methods"].get(method, {}).get(key, {"mean": float("nan"), "std": 0.0}) for r in summary]
            ax.errorbar(ratios, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3, label=method)
        if key == "kl_test":
            spread = [summary[r]["spread"]["kl_test"]["mean"] for r in summary]
            ax.plot(ratios, spread, "k--", label="retrain vs retrain")
        ax.set_xlabel("ratio of training examples edited")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "metrics_vs_ratio.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for entry in results["residuals"]:
        ax.semilogy(range(len(entry["history"])), entry["history"], marker=".", label=f"ratio {entry['ratio']}, seed {entry['seed']}")
    ax.set_xlabel("solver iteration")
    ax.set_ylabel("relative residual ‖(H+λI)v − b‖/‖b‖")
    if results["residuals"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "solver_residual.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / max(len(ratios), 1)
    for k, ratio in enumerate(summary):
        seconds = [summary[ratio]["methods"].get(m, {}).get("seconds", {"mean": 0.0})["mean"] for m in methods]
        ax.bar(np.arange(len(methods)) + k * width, seconds, width, label=f"ratio {ratio}")
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=20)
    ax.set_ylabel("wall time (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "time_per_method.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def finish(results: dict[str, Any]) -> dict[str, Any]:
    """Add ``summary`` and ``targets`` to the raw results."""
    results["summary"] = summarise(results)
    results["targets"] = check_targets(results["config"]["task"], results["summary"])
    return results


def write_results(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write results.json, results.md and the plots into ``out_dir`` (created); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(out / "results.md", render_markdown(results))
    return [out / "results.json", out / "results.md", *write_plots(results, out)]
