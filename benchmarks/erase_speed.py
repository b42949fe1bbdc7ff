"""Erase time against retrain time and the gradient floor, with and without a cached curvature.

On SmolLM2-135M + LoRA (r=8, q_proj/v_proj) and TALLRec examples from MovieLens-100k: fine-tune once on
``--n-train`` examples, fit each cached curvature of ``--curvature-methods`` (K-FAC, EK-FAC, DataInf) once
and calibrate its step length once against the exact operator (``fit-curvature``'s calibration), then for
request sets of each size in ``--requests`` (removals of random training examples) measure:

- floor: one forward+backward pass over the affected examples (what forming b costs at least);
- erase (cold): b + damped Gauss–Newton cg on ``--curvature-examples`` examples, ``--cg-iters`` iterations;
- erase (cached): b + the cached solve with the calibrated step length (``--curvature-use direct``): no
  exact curvature product at erase time;
- erase (trust region, ``--trust-region``): the cached erase followed by up to ``--trust-region-steps``
  re-linearised steps accepted in function space (``EraseConfig.trust_region``; ``--heldout-examples``
  test examples as the held-out set), what ``erase --mode auto`` runs when it updates;
- retrain: training from scratch on the edited set (measured once, for the middle request size; the
  others cost the same up to the small change in n);
- the relative residual of each update against the exact damped Gauss–Newton operator on a probe set,
  the test AUC of each adapter, and the peak resident memory of each stage (sampled every 20 ms).

Usage: python benchmarks/erase_speed.py [--model smollm2-135m] [--n-train 1000] [--out DIR]
Writes DIR/results.json and DIR/results.md (with the machine description and this command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmeraser.adapter import AdapterParameters, LoraSettings, attach_lora
from llmeraser.curvature import (
    CurvatureOperator,
    calibrate_step_length,
    curvature_methods,
    fit_cached_curvature,
    load_cache,
    load_calibration,
    save_cache,
)
from llmeraser.data import TokenizationConfig, tokenize_examples
from llmeraser.eraser import EraseConfig, erase, peak_memory_mb
from llmeraser.errors import NumericalError
from llmeraser.evaluate import answer_scores, auc, binary_labels
from llmeraser.gradients import summed_gradient
from llmeraser.models import load_base_model
from llmeraser.requests import Remove, edited_training_set, resolve
from llmeraser.solvers import relative_residual
from llmeraser.train import TrainConfig, train_adapter
from llmeraser_bench.recsys.tallrec import movielens_demo_examples
from llmeraser_bench.resources import machine, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--history-length", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--curvature-examples", type=int, default=32)
    parser.add_argument("--kfac-examples", type=int, default=256, help="examples the cached curvature is fitted on")
    parser.add_argument("--curvature-methods", nargs="+", default=list(curvature_methods()),
                        help="cached curvatures to compare (each fitted once and step-calibrated once)")
    parser.add_argument("--calibration-examples", type=int, default=8)
    parser.add_argument("--calibration-directions", type=int, default=4)
    parser.add_argument("--cg-iters", type=int, default=5)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--probe-examples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-region", action="store_true",
                        help="also time the cached erase with the trust region (the default path's update)")
    parser.add_argument("--trust-region-steps", type=int, default=EraseConfig.trust_region_steps)
    parser.add_argument("--heldout-examples", type=int, default=16, help="test examples the trust region holds out")
    parser.add_argument("--skip-cold", action="store_true", help="do not time the cold (uncached cg) erase")
    parser.add_argument("--out", default="benchmarks/results/erase_speed")
    parser.add_argument("--memory-stage", default=None, help=argparse.SUPPRESS)  # internal: one stage in a fresh process
    parser.add_argument("--memory-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_stage:
        run_memory_stage(args)
        return
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])

    recipe = training_recipe(args)
    splits = movielens_demo_examples(args.n_train, args.n_test, args.history_length, args.seed)
    train, test = splits.train, splits.test
    heldout = test[: args.heldout_examples]
    model, tokenizer, params = load_model(args)
    theta_init = params.flat()
    results: dict = {"command": command, "machine": machine(), "settings": vars(args), "stages": {}, "requests": []}
    stages = results["stages"]

    print(f"train: {len(train)} examples × {args.epochs} epoch(s)", flush=True)
    with measured(stages, "train"):
        train_adapter(model, tokenizer, train, recipe, progress=True)
    theta = params.flat()
    with measured(stages, "one_train_step"):
        train_adapter(model, tokenizer, train[: recipe.batch_size], TrainConfig(**{**recipe.to_json(), "epochs": 1}))
    params.assign(theta)

    config = TokenizationConfig(max_length=recipe.max_length)
    test_labels = binary_labels(test)

    def test_auc(vector: torch.Tensor) -> float:
        params.assign(vector)
        try:
            return auc(test_labels, answer_scores(model, tokenizer, test))
        finally:
            params.assign(theta)

    results["auc_original"] = test_auc(theta)
    rng = np.random.default_rng(args.seed)
    cache_subset = sorted(rng.permutation(len(train))[: args.kfac_examples])
    cache_items = tokenize_examples(tokenizer, [train[i] for i in cache_subset], config)
    caches = {}
    for method in args.curvature_methods:
        print(f"fit {method} on {len(cache_items)} examples + calibrate its step length", flush=True)
        with measured(stages, f"fit_{method}"):
            layers = fit_cached_curvature(model, params, cache_items, tokenizer.pad_token_id, method, batch_size=8,
                                          seed=args.seed, calibration_examples=0).layers
        with measured(stages, f"calibrate_{method}"):
            calibration = calibrate_step_length(
                model, params, layers, cache_items, tokenizer.pad_token_id, args.calibration_examples,
                args.calibration_directions, args.damping, recipe.weight_decay, seed=args.seed,
            )
        stages[f"calibrate_{method}"]["step_length"] = calibration.step_length
        stages[f"calibrate_{method}"]["residuals"] = list(calibration.residuals)
        caches[method] = (layers, calibration)
    probe_subset = sorted(rng.permutation(len(train))[: args.probe_examples])
    probe_items = tokenize_examples(tokenizer, [train[i] for i in probe_subset], config)
    probe = CurvatureOperator(model, params, probe_items, tokenizer.pad_token_id, "gauss-newton", args.damping,
                              recipe.weight_decay)

    erase_config = EraseConfig(solver="cg", curvature="gauss-newton", damping=args.damping, weight_decay=recipe.weight_decay,
                               max_iters=args.cg_iters, tol=1e-6, curvature_examples=args.curvature_examples, seed=args.seed)
    retrain_size = sorted(args.requests)[len(args.requests) // 2]
    for k in args.requests:
        ids = [train[i].id for i in sorted(rng.permutation(len(train))[:k])]
        requests = [Remove(i) for i in ids]
        row: dict = {"k": k}
        affected = tokenize_examples(tokenizer, [e for e in train if e.id in set(ids)], config)
        print(f"requests: {k} removals", flush=True)
        with measured(row, "floor"):
            summed_gradient(model, params, affected, tokenizer.pad_token_id, 8)
        variants = [] if args.skip_cold else [("cold", erase_config, {})]
        for method, (layers, calibration) in caches.items():
            cached = {"curvature_cache": layers, "calibration": calibration}
            direct = dataclasses.replace(erase_config, curvature_use="direct")
            variants.append((f"cached_{method}", direct, cached))
            if args.trust_region:
                region = dataclasses.replace(direct, trust_region=True, trust_region_steps=args.trust_region_steps)
                variants.append((f"tr_{method}", region, {**cached, "heldout": heldout}))
        for name, variant_config, options in variants:
            try:
                with measured(row, f"erase_{name}"):
                    result = erase(model, tokenizer, train, requests, variant_config, **options)
            except NumericalError as err:  # reported, not hidden: the row says why there is no number
                row[f"error_{name}"] = str(err)
                row[f"residual_{name}_probe"] = row[f"auc_erased_{name}"] = float("nan")
                continue
            row[f"residual_{name}_probe"] = relative_residual(probe, result.update, result.rhs)
            row[f"auc_erased_{name}"] = test_auc(result.theta_new)
            row[f"solver_{name}"] = result.solver.summary()
            if result.report.get("trust_region"):
                region_report = result.report["trust_region"]
                row[f"trust_region_{name}"] = {"steps": len(region_report["steps"]), "stopped": region_report["stopped"]}
            row["b_norm"] = result.report["b_norm"]
        if k == retrain_size:
            params.assign(theta_init)
            with measured(row, "retrain"):
                train_adapter(model, tokenizer, edited_training_set(train, resolve(requests, train)), recipe, progress=True)
            retrained = params.flat()
            params.assign(theta)
            row["auc_retrained"] = test_auc(retrained)
        results["requests"].append(row)
        print(json.dumps(row), flush=True)

    largest = max(args.requests)
    print(f"peak memory in fresh processes: one training step, and the cached erase of {largest} removals", flush=True)
    with tempfile.TemporaryDirectory() as work:
        torch.save(theta, Path(work) / "theta.pt")
        ids = [train[i].id for i in sorted(np.random.default_rng(args.seed + 1).permutation(len(train))[:largest])]
        (Path(work) / "requests.json").write_text(json.dumps(ids))
        for method, (layers, calibration) in caches.items():
            save_cache(layers, Path(work) / method, {"calibration": calibration.to_json()})
        stages_to_measure = ["train_step", *(f"erase_cached_{m}" for m in caches)]
        results["memory"] = {"requests": largest, **{stage: stage_peak_memory(stage, work) for stage in stages_to_measure}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))
    print(f"written to {out}")


def training_recipe(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=8, weight_decay=1e-2, seed=args.seed)


def load_model(args: argparse.Namespace) -> tuple:
    """(PEFT model with a fresh LoRA r=8 on q_proj/v_proj, tokenizer, its AdapterParameters)."""
    base, tokenizer = load_base_model(args.model, seed=args.seed)
    model = attach_lora(base, LoraSettings(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"), seed=args.seed))
    return model, tokenizer, AdapterParameters.of(model)


def stage_peak_memory(stage: str, work: str) -> dict:
    """Run ``stage`` in a fresh process of this script (the same arguments) and return its
    ``{"seconds", "peak_rss_mib"}``: the process's peak resident memory over its whole life (model loading
    included; ``eraser.peak_memory_mb``, the measure erasure_report.json records), so that stages are compared
    as the separate commands a user runs, not inside one long process whose resident memory keeps what earlier
    stages allocated."""
    command = [sys.executable, *sys.argv, "--memory-stage", stage, "--memory-dir", work]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory_stage(args: argparse.Namespace) -> None:
    """``--memory-stage train_step | erase_cached_<method>``: load the model and the adapter θ saved in
    ``--memory-dir``, run that stage once, print its time and the process's peak RSS as JSON."""
    work = Path(args.memory_dir)
    train = movielens_demo_examples(args.n_train, args.n_test, args.history_length, args.seed).train
    model, tokenizer, params = load_model(args)
    params.assign(torch.load(work / "theta.pt"))
    recipe = training_recipe(args)
    start = time.perf_counter()
    if args.memory_stage == "train_step":
        train_adapter(model, tokenizer, train[: recipe.batch_size], TrainConfig(**{**recipe.to_json(), "epochs": 1}))
    else:
        method = args.memory_stage.removeprefix("erase_cached_")
        layers, metadata = load_cache(work / method, {})
        requests = [Remove(i) for i in json.loads((work / "requests.json").read_text())]
        config = EraseConfig(solver="cg", curvature="gauss-newton", damping=args.damping, weight_decay=recipe.weight_decay,
                             curvature_use="direct", seed=args.seed)
        erase(model, tokenizer, train, requests, config, curvature_cache=layers, calibration=load_calibration(metadata))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_memory_mb()}))


def render(results: dict) -> str:
    stages = results["stages"]
    lines = [
        "# Erase vs retrain: time and memory",
        "",
        f"Command: `{results['command']}`",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()),
        "",
        f"- train ({results['settings']['n_train']} examples, {results['settings']['epochs']} epoch): "
        f"{stages['train']['seconds']:.0f} s, peak RSS {stages['train']['peak_rss_mib']:.0f} MiB",
        f"- one training step (batch 8): {stages['one_train_step']['seconds']:.1f} s, "
        f"peak RSS {stages['one_train_step']['peak_rss_mib']:.0f} MiB",
        *(f"- fit {m} ({results['settings']['kfac_examples']} examples): {stages['fit_' + m]['seconds']:.0f} s; "
          f"step-length calibration {stages['calibrate_' + m]['seconds']:.0f} s "
          f"(α = {stages['calibrate_' + m]['step_length']:.3g})"
          for m in results["settings"]["curvature_methods"]),
        f"- test AUC of the original adapter: {results['auc_original']:.4f}",
        "",
        "Times in seconds; residual = ‖(H+λI)v − b‖/‖b‖ on the probe examples (exact operator), measured after the timed erase "
        "(for the trust region, several steps on the retraining objective, it only says how far it left the one-step "
        "solution). "
        "RSS during erase: the benchmark process's resident memory, which keeps what earlier stages allocated (caches, "
        "freed-but-not-returned heap); the fair memory comparison is the fresh-process one after the targets.",
        "",
    ]
    variants = erase_variants(results)
    lines += [
        "| requests | floor | retrain | " + " | ".join(f"erase {v}" for v in variants) + " | "
        + " | ".join(f"residual {v}" for v in variants) + " | AUC retrain | " + " | ".join(f"AUC {v}" for v in variants)
        + " | RSS during erase (MiB) |",
        "|---" * (5 + 3 * len(variants)) + "|",
    ]
    for row in results["requests"]:
        retrain = f"{row['retrain']['seconds']:.0f}" if "retrain" in row else "–"
        auc_retrain = f"{row['auc_retrained']:.4f}" if row.get("auc_retrained") is not None else "–"
        peak = max(row[f"erase_{v}"]["peak_rss_mib"] for v in variants if f"erase_{v}" in row)
        lines.append(
            f"| {row['k']} | {row['floor']['seconds']:.1f} | {retrain} | "
            + " | ".join(f"{row[f'erase_{v}']['seconds']:.1f}" if f"erase_{v}" in row else "–" for v in variants) + " | "
            + " | ".join(f"{row[f'residual_{v}_probe']:.3f}" for v in variants) + f" | {auc_retrain} | "
            + " | ".join(f"{row[f'auc_erased_{v}']:.4f}" for v in variants) + f" | {peak:.0f} |"
        )
    regions = [f"{row['k']} requests, {v}: {row[f'trust_region_{v}']['steps']} step(s), stopped: "
               f"{row[f'trust_region_{v}']['stopped']}" for row in results["requests"] for v in variants
               if f"trust_region_{v}" in row]
    if regions:
        lines += ["", "Trust region: " + "; ".join(regions) + "."]
    lines += ["", *targets(results)]
    return "\n".join(lines) + "\n"


def erase_variants(results: dict) -> list[str]:
    """The erase variants a run timed, in table order: cold, then per cached method the one step and the trust region."""
    settings = results["settings"]
    cached = [name for m in settings["curvature_methods"]
              for name in (f"cached_{m}", *([f"tr_{m}"] if settings.get("trust_region") else []))]
    return [*([] if settings.get("skip_cold") else ["cold"]), *cached]


def targets(results: dict) -> list[str]:
    """The speed and memory targets, met or not, per request size and cached curvature: erase ≤ 2× the floor,
    ≤ 1/20 of retrain (the one measured retrain, of the middle request size, stands for all sizes: n differs
    by at most the largest request set), peak RSS of erase ≤ 1.5× that of one training step."""
    rows = results["requests"]
    retrain = next((row["retrain"]["seconds"] for row in rows if "retrain" in row), None)
    variants = erase_variants(results)
    verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines = [
        "Targets (cached erase ≤ 2× the floor and ≤ 1/20 of retrain; the cold and trust-region erases for comparison):",
        "",
        "| requests | variant | erase ÷ floor | erase ÷ retrain | residual | AUC − AUC original | AUC − AUC retrain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for variant in variants:
            if f"erase_{variant}" not in row:
                continue
            seconds = row[f"erase_{variant}"]["seconds"]
            by_floor = seconds / row["floor"]["seconds"]
            by_retrain = seconds / retrain if retrain else float("nan")
            lines.append(
                f"| {row['k']} | {variant} | {by_floor:.2f} ({verdict(by_floor <= 2)}) | "
                f"1/{1 / by_retrain:.1f} ({verdict(by_retrain <= 1 / 20)}) | "
                f"{row[f'residual_{variant}_probe']:.3f} | {row[f'auc_erased_{variant}'] - results['auc_original']:+.4f} | "
                + (f"{row[f'auc_erased_{variant}'] - row['auc_retrained']:+.4f} |" if "auc_retrained" in row else "– |")
            )
    memory = results.get("memory")
    if memory:
        step = memory["train_step"]["peak_rss_mib"]
        lines += [
            "",
            f"Peak memory, each stage in a fresh process (model loading included): one training step (batch 8) "
            f"{step:.0f} MiB; " + "; ".join(
                f"cached {m} erase of {memory['requests']} removals {memory[f'erase_cached_{m}']['peak_rss_mib']:.0f} MiB = "
                f"{memory[f'erase_cached_{m}']['peak_rss_mib'] / step:.2f}× "
                f"({verdict(memory[f'erase_cached_{m}']['peak_rss_mib'] <= 1.5 * step)}: ≤ 1.5×)"
                for m in results["settings"]["curvature_methods"]
            ) + ".",
        ]
    return lines


if __name__ == "__main__":
    main()
