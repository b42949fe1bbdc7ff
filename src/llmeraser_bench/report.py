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

from llmeraser.atomic import write_text_atomic
from llmeraser_bench.yardstick import effect_captured, removal_effect, retrain_range, within

METRICS: tuple[tuple[str, str, str], ...] = (
    ("test_auc", "test AUC", ".4f"),
    ("loss_old", "loss edited (old)", ".4f"),
    ("loss_new", "loss edited (new)", ".4f"),
    ("loss_test", "test loss", ".4f"),
    ("accuracy_new", "acc. edited (new)", ".3f"),
    ("mia_auc", "MIA AUC", ".3f"),
    ("mia_minkpp", "MIA Min-K%++", ".3f"),
    ("mia_zlib", "MIA zlib", ".3f"),
    ("mia_reference", "MIA ref.", ".3f"),
    ("kl_test", "KL→retrain test", ".2e"),
    ("kl_edited", "KL→retrain edited", ".2e"),
    ("seconds", "time (s)", ".1f"),
    ("peak_rss_mib", "peak RSS (MiB)", ".0f"),
)
PII_METRICS: tuple[tuple[str, str, str], ...] = (
    ("extract_removed", "extraction (removed)", ".3f"),
    ("loglik_removed", "log-lik. removed", ".3f"),
    ("mia_auc", "MIA AUC", ".3f"),
    ("mia_minkpp", "MIA Min-K%++", ".3f"),
    ("mia_zlib", "MIA zlib", ".3f"),
    ("mia_reference", "MIA ref.", ".3f"),
    ("corrected_rate", "says corrected", ".3f"),
    ("old_value_rate", "says old value", ".3f"),
    ("extract_kept", "extraction (kept)", ".3f"),
    ("loss_test", "loss kept", ".4f"),
    ("kl_test", "KL→retrain kept", ".2e"),
    ("kl_edited", "KL→retrain edited", ".2e"),
    ("seconds", "time (s)", ".1f"),
    ("peak_rss_mib", "peak RSS (MiB)", ".0f"),
)
NEXT_ITEM_METRICS: tuple[tuple[str, str, str], ...] = (
    ("hr1", "HR@1", ".4f"),
    ("valid_ratio", "valid answers", ".3f"),
    *(c for c in METRICS if c[0] not in ("test_auc", "accuracy_new")),
)
_ATTACKED_LOSS_AND_MIA: tuple[tuple[str, str, str], ...] = (
    ("loss_removed_q8", "loss q8", ".4f"),
    ("loss_removed_q4", "loss q4", ".4f"),
    ("loss_removed_relearn", "loss relearn", ".4f"),
    ("mia_auc", "MIA", ".3f"),
    ("mia_q8", "MIA q8", ".3f"),
    ("mia_q4", "MIA q4", ".3f"),
    ("mia_relearn", "MIA relearn", ".3f"),
)
ATTACK_METRICS: tuple[tuple[str, str, str], ...] = (("loss_old", "loss forgotten", ".4f"), *_ATTACKED_LOSS_AND_MIA)
PII_ATTACK_METRICS: tuple[tuple[str, str, str], ...] = (
    ("loglik_removed", "log-lik. removed", ".3f"),
    *_ATTACKED_LOSS_AND_MIA,
    ("extract_removed", "extraction", ".3f"),
    ("extract_removed_q8", "extraction q8", ".3f"),
    ("extract_removed_q4", "extraction q4", ".3f"),
    ("extract_removed_relearn", "extraction relearn", ".3f"),
)
# per attack (``bench.robustness``): its metrics; "finds more than on Retrain" is a lower loss than the lowest
# retrained model's, an extraction rate above the highest one's, or a MIA AUC above Retrain's mean + 0.05
ATTACKS = {"quantisation": ("q8", "q4"), "relearning": ("relearn",)}
ATTACK_KEYS = tuple(key for prefix in ("loss_removed", "mia", "extract_removed")
                    for suffixes in ATTACKS.values() for suffix in suffixes for key in [f"{prefix}_{suffix}"])
MIA_TOLERANCE = 0.05


# the metrics whose removal effect the yardstick measures (``bench.yardstick``), per kind of task
EFFECT_METRICS = ("loss_old", "loss_new", "test_auc", "loss_test", "mia_auc", "accuracy_new")
PII_EFFECT_METRICS = ("loglik_removed", "extract_removed", "mia_auc", "loss_test", "extract_kept")
NEXT_ITEM_EFFECT_METRICS = ("loss_old", "loss_new", "hr1", "loss_test", "mia_auc")


def effect_metrics(task: str) -> tuple[str, ...]:
    return {"pii": PII_EFFECT_METRICS, "next-item": NEXT_ITEM_EFFECT_METRICS}.get(task, EFFECT_METRICS)


def metric_columns(task: str) -> tuple[tuple[str, str, str], ...]:
    """(key, title, format) of every metric summarised for ``task`` (the main table's, then the attacks')."""
    main, attacks = table_columns(task)
    return (*main, *(c for c in attacks if c[0] not in {k for k, _, _ in main}))


def table_columns(task: str) -> tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]:
    """The columns of the main table and of the attacks' table ("is it really forgotten?") for ``task``."""
    if task == "pii":
        return PII_METRICS, PII_ATTACK_METRICS
    return (NEXT_ITEM_METRICS if task == "next-item" else METRICS), ATTACK_METRICS


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
        seeds = sorted({row["seed"] for row in rows})
        attack_range = {key: retrain_range(_by_seed(rows, "retrain", key, seeds)) for key in ATTACK_KEYS
                        if any(key in row for row in rows)}
        summary[str(ratio)] = {"methods": methods, "spread": spread, "attack_range": attack_range,
                               **yardstick_summary(rows, effect_metrics(results["config"]["task"]))}
    return summary


def _by_seed(rows: Sequence[dict[str, Any]], method: str, key: str, seeds: Sequence[int]) -> list[float]:
    values = {row["seed"]: row.get(key, float("nan")) for row in rows if row["method"] == method}
    return [float("nan") if values.get(s) is None else float(values[s]) for s in seeds]


def yardstick_summary(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Per metric: the removal's own effect over paired seeds (``resolution``), the retrained models'
    range, and per method the effect captured with its interval and whether its mean lies in that range."""
    seeds = sorted({row["seed"] for row in rows})
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m not in ("original", "retrain")]
    resolution: dict[str, Any] = {}
    ranges: dict[str, Any] = {}
    effects: dict[str, Any] = {}
    for key in metrics:
        original, retrain = _by_seed(rows, "original", key, seeds), _by_seed(rows, "retrain", key, seeds)
        if not any(math.isfinite(v) for v in retrain):
            continue
        resolution[key] = removal_effect(original, retrain)
        ranges[key] = retrain_range(retrain)
        for method in methods:
            values = _by_seed(rows, method, key, seeds)
            finite = [v for v in values if math.isfinite(v)]
            effects.setdefault(method, {})[key] = {
                **effect_captured(values, original, retrain),
                "inside_retrain_range": within(float(np.mean(finite)), ranges[key]) if finite else False,
            }
    return {"resolution": resolution, "retrain_range": ranges, "effects": effects}


ERASERS = ("llmeraser", "llmeraser_cached", "llmeraser_tr")
REMOVED_LOSS = {"pii": "loglik_removed"}  # the removed examples' loss metric per task (default loss_old)


def check_targets(task: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark issue's targets per ratio and LLMEraser variant, each with the measured value and
    whether it is met (means over seeds)."""
    targets = []
    for ratio, block in summary.items():
        mean = {m: {k: v["mean"] for k, v in metrics.items()} for m, metrics in block["methods"].items()}
        targets += _yardstick_targets(task, ratio, block, mean)
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
                key, what = ("hr1", "HR@1") if task == "next-item" else ("test_auc", "AUC")
                gain = retrain[key] - original[key]
                recovered = (eraser[key] - original[key]) / gain if gain > 0 else float("nan")
                targets.append({"ratio": ratio,
                                "target": f"{name}: recovers ≥ 80 % of Retrain's {what} gain over the corrupted model",
                                "value": recovered, "met": bool(gain > 0 and recovered >= 0.8),
                                "note": "" if gain > 0
                                else f"Retrain does not gain {what} over the corrupted model ({gain:+.4f})"})
            targets.append({"ratio": ratio, "target": f"{name}: KL to Retrain (test) ≤ retrain-vs-retrain spread",
                            "value": eraser["kl_test"], "threshold": spread,
                            "met": bool(not math.isnan(spread) and eraser["kl_test"] <= spread)})
            ratio_time = eraser["seconds"] / retrain["seconds"]
            targets.append({"ratio": ratio, "target": f"{name}: erase time ≤ 1/5 of retrain time", "value": ratio_time,
                            "met": bool(ratio_time <= 0.2)})
    return targets


def _yardstick_targets(task: str, ratio: str, block: dict[str, Any], mean: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The faithful-erase targets against the retrained models' distribution: effect captured 0.8–1.2 on
    the removed examples' loss (where the yardstick resolves the effect), MIA within 0.05 of Retrain's
    mean, and the collateral metric (test / kept loss) inside the retrained models' range."""
    targets: list[dict[str, Any]] = []
    effects, ranges, resolution = block.get("effects", {}), block.get("retrain_range", {}), block.get("resolution", {})
    removed_key = REMOVED_LOSS.get(task, "loss_old")
    for name in (n for n in ERASERS if n in effects):
        captured = effects[name].get(removed_key)
        if captured is not None:
            resolved = resolution[removed_key]
            targets.append({"ratio": ratio, "target": f"{name}: effect captured on the removed examples' loss in 0.8–1.2",
                            "value": captured["mean"], "met": bool(resolved["resolved"] and 0.8 <= captured["mean"] <= 1.2),
                            "note": (f"interval {captured['low']:.2f}–{captured['high']:.2f}; the removal's effect "
                                     f"{resolved['mean']:+.4f} ± {resolved['half_width']:.4f} (95 %)"
                                     + ("" if resolved["resolved"] else ": not resolved by this setting"))})
        if "mia_auc" in mean.get(name, {}) and "mia_auc" in mean.get("retrain", {}):
            gap = abs(mean[name]["mia_auc"] - mean["retrain"]["mia_auc"])
            targets.append({"ratio": ratio, "target": f"{name}: MIA AUC within 0.05 of Retrain's mean", "value": gap,
                            "met": bool(gap <= 0.05)})
        attacks = [k for k in ("mia_auc", "mia_minkpp", "mia_zlib", "mia_reference")
                   if math.isfinite(mean.get(name, {}).get(k, float("nan"))) and k in mean.get("retrain", {})]
        if attacks:  # forgotten only if no attack finds more than it finds on Retrain (+ 0.05)
            excess = max(mean[name][k] - mean["retrain"][k] for k in attacks)
            targets.append({"ratio": ratio, "target": f"{name}: no membership attack finds more than on Retrain (+0.05)",
                            "value": excess, "met": bool(excess <= 0.05), "note": ", ".join(
                                f"{k} {mean[name][k]:.3f} vs {mean['retrain'][k]:.3f}" for k in attacks)})
        targets += _attack_targets(ratio, name, mean, block.get("attack_range", {}))
        if "loss_test" in effects[name] and "loss_test" in ranges:
            span = ranges["loss_test"]
            targets.append({"ratio": ratio,
                            "target": f"{name}: {'kept' if task == 'pii' else 'test'} loss inside the retrained models' range",
                            "value": mean[name]["loss_test"], "met": effects[name]["loss_test"]["inside_retrain_range"],
                            "note": f"retrained {span['min']:.4f}–{span['max']:.4f}"})
    return targets


def _attack_targets(ratio: str, name: str, mean: dict[str, dict[str, float]],
                    ranges: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per attack (quantisation, relearning): met when none of its checks (``ATTACKS``) finds more on the method
    than on Retrain; the value is the number of checks that do."""
    targets = []
    mine, retrain = mean.get(name, {}), mean.get("retrain", {})
    for attack, suffixes in ATTACKS.items():
        checks = []  # (what, method's value, Retrain's bound, finds more)
        for suffix in suffixes:
            for prefix in ("loss_removed", "mia", "extract_removed"):
                key = f"{prefix}_{suffix}"
                value = mine.get(key, float("nan"))
                if not math.isfinite(value) or key not in ranges or not math.isfinite(ranges[key]["mean"]):
                    continue
                if prefix == "mia":
                    bound = retrain[key] + MIA_TOLERANCE
                    checks.append((key, value, bound, value > bound))
                elif prefix == "loss_removed":
                    checks.append((key, value, ranges[key]["min"], value < ranges[key]["min"]))
                else:
                    checks.append((key, value, ranges[key]["max"], value > ranges[key]["max"]))
        if checks:
            failed = sum(fails for *_, fails in checks)
            targets.append({"ratio": ratio,
                            "target": f"{name}: the {attack} attack finds no more than on Retrain (checks that find more)",
                            "value": float(failed), "met": failed == 0, "note": ", ".join(
                                f"{key} {value:.3f} (Retrain's bound {bound:.3f}{': finds more' if fails else ''})"
                                for key, value, bound, fails in checks)})
    return targets


def _cell(stats: dict[str, float], fmt: str) -> str:
    if stats["n"] == 0:
        return "–"
    text = format(stats["mean"], fmt)
    return f"{text} ± {format(stats['std'], fmt)}" if stats["n"] > 1 else text


def summary_rows(
    summary: dict[str, Any], columns: Sequence[tuple[str, str, str]], spread_row: bool = True
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per ratio, the table rows (one per method, then the retrain-vs-retrain spread unless not
    ``spread_row``) as formatted text."""
    tables = []
    for ratio, block in summary.items():
        rows = [{"method": method, **{key: _cell(stats[key], fmt) for key, _, fmt in columns}}
                for method, stats in block["methods"].items()]
        spread = block["spread"]
        if spread_row and spread["kl_test"]["n"]:
            rows.append({"method": "retrain vs retrain (seeds)", **{key: "" for key, _, _ in columns},
                         "kl_test": _cell(spread["kl_test"], ".2e"), "kl_edited": _cell(spread["kl_edited"], ".2e")})
        tables.append((ratio, rows))
    return tables


def render_text(results: dict[str, Any]) -> str:
    """The paper-style table(s) and the targets, as printed on the terminal."""
    lines = []
    titles = ("", " — attacks: is it really forgotten?")
    for group, (metrics, title) in enumerate(zip(table_columns(results["config"]["task"]), titles)):
        columns = [("method", "method", ""), *metrics]
        for ratio, rows in summary_rows(results["summary"], metrics, spread_row=group == 0):
            present = [c for c in columns if any(row.get(c[0]) not in ("", "–") for row in rows)]
            if len(present) > 1:
                lines += [f"task {results['config']['task']}, ratio {ratio} ({results['requests'][ratio]} requests), "
                          f"mean ± std over {len(results['config']['seeds'])} seed(s){title}", format_table(rows, present), ""]
    for ratio, block in results["summary"].items():
        lines += _effects_markdown(ratio, block)
    for target in results["targets"]:
        lines.append(f"[{'met' if target['met'] else 'NOT met'}] ratio {target['ratio']}: {target['target']}: "
                     f"{target['value']:.4g}" + (f" (threshold {target['threshold']:.4g})" if "threshold" in target else "")
                     + (f" — {target['note']}" if target.get("note") else ""))
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: command, machine, the table per ratio, targets, and what each column means."""
    main, attacks = table_columns(results["config"]["task"])
    out = [f"# llmeraser bench — task `{results['config']['task']}`", "",
           f"Command: `{results['command']}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), "",
           f"Load average (1, 5, 15 min) at the start {results['machine'].get('load_average_1_5_15_min')}, at the end "
           f"{results.get('machine_at_end', {}).get('load_average_1_5_15_min')} (2 cores: above ~1 per core, something "
           "else was running and the times are inflated)", ""]
    if results.get("complete") is False:
        done = ", ".join(f"{d['seed']} (ratio {d['ratio']})" for d in results.get("seeds_done", []))
        out += [f"**Partial run** (written after each seed; interrupted or still running): seeds done {done}, of "
                f"{', '.join(map(str, results['config']['seeds']))}; every figure below is over the seeds done.", ""]
    for group, (metrics, heading) in enumerate(((main, "##"), (attacks, "### attacks, is it really forgotten? —"))):
        columns = [("method", "method"), *((key, title) for key, title, _ in metrics)]
        for ratio, rows in summary_rows(results["summary"], metrics, spread_row=group == 0):
            present = [c for c in columns if any(row.get(c[0]) not in ("", "–") for row in rows)]
            if len(present) < 2:
                continue
            seeds = sorted({r["seed"] for r in results["rows"] if str(r["ratio"]) == ratio})
            out += [f"{heading} ratio {ratio} ({results['requests'][ratio]} requests; mean ± std over seeds "
                    f"{', '.join(map(str, seeds))})", "",
                    "| " + " | ".join(title for _, title in present) + " |",
                    "|" + "---|" * len(present)]
            out += ["| " + " | ".join(str(row.get(key, "")) for key, _ in present) + " |" for row in rows]
            out.append("")
    for ratio, block in results["summary"].items():
        out += _effects_markdown(ratio, block)
    out += ["## Targets", ""]
    for target in results["targets"]:
        threshold = f" (threshold {target['threshold']:.4g})" if "threshold" in target else ""
        note = f" — {target['note']}" if target.get("note") else ""
        out.append(f"- {'met' if target['met'] else '**not met**'}: ratio {target['ratio']}, {target['target']}: "
                   f"{target['value']:.4g}{threshold}{note}")
    for entry in results.get("caches", []):
        if entry.get("reused"):
            out.append(f"- llmeraser_cached (ratio {entry['ratio']}, seed {entry['seed']}): the {entry['method']} curvature "
                       "fitted for an earlier ratio of this seed (the same training set), not fitted again")
            continue
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
            "the edited examples' old versions against never-trained examples (0.5 = indistinguishable); Min-K%++, zlib "
            "and ref. (the retrained model as the reference) are the stronger attacks of `bench.attacks`. Attacks "
            "(`bench.robustness`), each also run on the retrained model: q8 / q4, the adapter merged into the adapted "
            "modules' base weights and each matrix rounded per output channel to 8 / 4 bits (symmetric "
            "round-to-nearest); relearn, a few full-batch fine-tuning steps at the recipe's lr on a small set of kept "
            "examples of the same users or people. Loss and MIA are those of the examples to be forgotten (removed "
            "examples; for query and response tasks the edited examples' training-set versions) under the attacked "
            "model; an attack finds more than on Retrain when the loss is below the lowest retrained model's, the "
            "extraction rate above the highest one's, or the MIA AUC above Retrain's mean + 0.05.", ""]
    return "\n".join(out)


def _effects_markdown(ratio: str, block: dict[str, Any]) -> list[str]:
    """The effect-captured table of one ratio: per method and metric E [95 % interval], * when the method's
    mean lies inside the retrained models' range; and the removal's own effect per metric."""
    resolution = block.get("resolution", {})
    if not resolution:
        return []
    keys = list(resolution)
    out = [f"### ratio {ratio}: effect captured, (method − original) / (mean retrain − mean original), paired seeds", "",
           "| | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1),
           "| removal's effect (retrain − original), ± 95 % | " + " | ".join(
               f"{resolution[k]['mean']:+.4f} ± {resolution[k]['half_width']:.4f}"
               + ("" if resolution[k]["resolved"] else " (not resolved)")
               for k in keys) + " |",
           "| retrained models' range | " + " | ".join(
               f"{block['retrain_range'][k]['min']:.4f}–{block['retrain_range'][k]['max']:.4f}" for k in keys) + " |"]
    for method, effects in block.get("effects", {}).items():
        cells = []
        for k in keys:
            e = effects.get(k)
            cells.append("–" if e is None or not math.isfinite(e["mean"]) else
                         f"{e['mean']:.2f} [{e['low']:.2f}, {e['high']:.2f}]" + (" *" if e["inside_retrain_range"] else ""))
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += ["", "1 = the retrained models' mean; * = the method's mean lies inside the retrained models' range.", ""]
    return out


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write (110 dpi) and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


EFFECT_AXIS = (-1.0, 3.0)  # the effect-captured chart's y range; values beyond are printed at its edge


def effect_plot_title(results: dict[str, Any], ratio: float | str) -> str:
    """The effect-captured chart's title: the task, the ratio (a number, or the summary's key for it) and the
    seeds scored at that ratio (a partial run's fewer than the configured ones)."""
    seeds = len({row["seed"] for row in results["rows"] if float(row["ratio"]) == float(ratio)})
    return (f"{results['config']['task']}, ratio {ratio}: mean over {seeds} paired seed{'s' * (seeds != 1)}, "
            "95 % intervals")


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """effect_captured.png (per ratio), time_per_method.png, solver_residual.png (when the cold update ran)
    and metrics_vs_ratio.png (only with several ratios); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    ratios = [float(r) for r in summary]
    methods = list(dict.fromkeys(m for block in summary.values() for m in block["methods"]))
    written = []

    for ratio, block in summary.items():  # effect captured: methods × metrics, 95 % intervals, 1 = Retrain
        effects = block.get("effects", {})
        keys = list(block.get("resolution", {}))
        shown = [m for m in effects if m not in ("gradient_ascent",)] or list(effects)
        if not keys or not shown:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) + 2), 4.2))
        width = 0.8 / len(shown)
        for k, method in enumerate(shown):
            values = [effects[method].get(key, {}).get("mean", float("nan")) for key in keys]
            low = [effects[method].get(key, {}).get("low", float("nan")) for key in keys]
            high = [effects[method].get(key, {}).get("high", float("nan")) for key in keys]
            x = np.arange(len(keys)) + (k - (len(shown) - 1) / 2) * width
            errors = np.array([[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]])
            clipped = np.clip(np.nan_to_num(values), *EFFECT_AXIS)
            bars = ax.bar(x, clipped, width, label=method)
            for bar, key in zip(bars, keys):  # an effect within the noise: a ratio of noise, drawn faint
                if not block["resolution"][key]["resolved"]:
                    bar.set_alpha(0.3)
                    bar.set_hatch("..")
            ax.errorbar(x, clipped, yerr=np.nan_to_num(errors), fmt="none", ecolor="black", capsize=3, lw=1)
            for xi, value, lo, hi in zip(x, values, low, high):  # what lies off the axis is printed at its edge
                if math.isfinite(value) and not EFFECT_AXIS[0] <= value <= EFFECT_AXIS[1]:
                    ax.text(xi, float(np.clip(value, *EFFECT_AXIS)), f"{value:.1f}", ha="center",
                            va="bottom" if value > 0 else "top", fontsize=7)
                elif math.isfinite(lo) and math.isfinite(hi) and (lo < EFFECT_AXIS[0] or hi > EFFECT_AXIS[1]):
                    ax.text(xi, EFFECT_AXIS[1], f"[{lo:.1f}, {hi:.1f}]", ha="center", va="bottom", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.axhline(1.0, color="black", ls="--", lw=1, label="Retrain (mean)")
        ax.axhline(0.0, color="grey", lw=0.8)
        resolution = block["resolution"]
        ax.set_xticks(np.arange(len(keys)), [f"{key}\n{'' if resolution[key]['resolved'] else '(effect not resolved: faint)'}"
                                             for key in keys], fontsize=8)
        ax.set_ylabel("effect captured (method − original) / (retrain − original)")
        ax.set_ylim(EFFECT_AXIS[0] - 0.15, EFFECT_AXIS[1] + 0.25)
        ax.set_title(effect_plot_title(results, ratio), fontsize=9)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / ("effect_captured.png" if len(summary) == 1 else f"effect_captured_{ratio}.png")))

    fit: dict[str, list[float]] = {}  # the one-off curvature fit, per ratio: drawn as its own part of the cached methods' bars
    for entry in results.get("caches", []):
        fit.setdefault(str(entry["ratio"]), []).append(entry["fit"]["seconds"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) + 2), 4.0))
    width = 0.8 / max(len(ratios), 1)
    for k, ratio in enumerate(summary):
        seconds = np.array([summary[ratio]["methods"].get(m, {}).get("seconds", {"mean": 0.0})["mean"] for m in methods])
        fit_s = float(np.mean(fit[ratio])) if ratio in fit else 0.0
        extra = np.array([fit_s if m in ("llmeraser_cached", "llmeraser_tr") else 0.0 for m in methods])
        x = np.arange(len(methods)) + k * width
        ax.bar(x, seconds, width, label=f"ratio {ratio}" if len(summary) > 1 else "the method's own time")
        ax.bar(x, extra, width, bottom=seconds, color="lightgrey", hatch="//", edgecolor="grey",
               label="one-off curvature fit" if k == 0 and fit_s else None)
        for xi, own, once in zip(x, seconds, extra):
            ax.text(xi, own + once, f"{own:.1f}" + (f"\n+{once:.1f} fit" if once else ""), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(methods)) + (len(ratios) - 1) * width / 2, methods, rotation=20, fontsize=8)
    ax.set_ylabel("wall time (s), mean over seeds")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the values printed on the bars
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "time_per_method.png"))

    if results["residuals"]:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for entry in results["residuals"]:
            ax.semilogy(range(len(entry["history"])), entry["history"], marker=".",
                        label=f"ratio {entry['ratio']}, seed {entry['seed']}")
        ax.set_xlabel("solver iteration")
        ax.set_ylabel("relative residual ‖(H+λI)v − b‖/‖b‖")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "solver_residual.png"))

    if len(ratios) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        first = (("extract_removed", "extraction rate (removed people)") if results["config"]["task"] == "pii"
                 else ("test_auc", "test AUC"))
        for ax, (key, title) in zip(axes, (first, ("kl_test", "KL to retrain (test)"), ("mia_auc", "MIA AUC"))):
            for method in methods:
                stats = [summary[r]["methods"].get(method, {}).get(key, {"mean": float("nan"), "std": 0.0}) for r in summary]
                ax.errorbar(ratios, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                            label=method)
            if key == "kl_test":
                spread = [summary[r]["spread"]["kl_test"]["mean"] for r in summary]
                ax.plot(ratios, spread, "k--", label="retrain vs retrain")
            ax.set_xlabel("ratio of training examples edited")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out / "metrics_vs_ratio.png"))
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
