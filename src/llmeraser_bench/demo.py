"""``llmeraser demo``: the whole method on built-in defaults, against exact retraining.

1. A small TALLRec-style data set from MovieLens-100k (shipped inside the ``recbole`` package).
2. Corrupt it: noisy histories in some prompts, flipped Yes/No labels in others (``mixed_task``).
3. Fine-tune a LoRA adapter on the corrupted set (the "original" adapter).
4. One mixed request file: remove some examples, restore the clean prompts, correct the labels.
5. Fit the adapter's curvature once (EK-FAC over the training set, its step length calibrated against
   the exact Gauss–Newton operator: ``fit-curvature``), then erase with it (``erase --curvature-cache
   --curvature-use direct``: the gradients of the edited examples and one cached solve); retrain from the
   same initial adapter, recipe and seed on the edited set.
6. One table: for original, erased and retrained adapters, the loss of the edited examples' old and new
   versions, the loss on the rest of the training set, held-out AUC, KL to the retrained model on the
   edited examples, and wall time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmeraser.adapter import AdapterParameters, LoraSettings, attach_lora
from llmeraser.curvature.cache import fit_cached_curvature
from llmeraser.data import TokenizationConfig, tokenize_examples
from llmeraser.eraser import EraseConfig, erase, peak_memory_mb
from llmeraser.evaluate import (
    answer_scores,
    auc,
    binary_labels,
    example_loss_values,
    function_space_distance,
)
from llmeraser.models import load_base_model
from llmeraser.options import option, validate
from llmeraser.plan import plan_erase
from llmeraser.requests import resolve
from llmeraser.train import TrainConfig, paired_schedule, train_adapter
from llmeraser.trust_region import TrustRegionSettings
from llmeraser_bench.protocol import SMOLLM2_LORA, SMOLLM2_RECIPE, TINY_LORA, smollm2_erase_config
from llmeraser_bench.recsys.corruption import mixed_task
from llmeraser_bench.recsys.tallrec import movielens_demo_examples
from llmeraser_bench.report import format_table


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo; the defaults finish in under 10 minutes on 2 CPU cores."""

    model: str = option("smollm2-135m", help="base model: smollm2-135m, tiny, a hub id or a local directory")
    n_train: int = 128
    n_test: int = 48
    history_length: int = 3
    remove_fraction: float = 0.03
    query_fraction: float = 0.03
    response_fraction: float = 0.03
    rest_sample: int = 32
    n_heldout: int = 24
    trust_region_steps: int = TrustRegionSettings.steps
    seed: int = option(0, help="seed of data sampling, adapter init and training order")
    lora: LoraSettings = SMOLLM2_LORA
    recipe: TrainConfig = SMOLLM2_RECIPE
    eraser: EraseConfig = field(default_factory=lambda: smollm2_erase_config(curvature_use="direct"))
    cache_method: str = "ekfac"
    calibration_examples: int = 8
    calibration_directions: int = 4

    def __post_init__(self) -> None:
        validate(self)


def tiny_demo_config() -> DemoConfig:
    """The same protocol on the tiny random-init model: a smoke run in well under a minute."""
    return DemoConfig(
        model="tiny",
        n_train=32,
        n_test=32,
        history_length=2,
        rest_sample=16,
        remove_fraction=0.05,
        query_fraction=0.05,
        response_fraction=0.05,
        lora=TINY_LORA,
        recipe=TrainConfig(epochs=4, lr=1e-2, batch_size=8, weight_decay=1e-2, max_length=512),
        eraser=EraseConfig(solver="cg", curvature="gauss-newton", damping=0.1, weight_decay=1e-2, max_iters=10,
                           tol=1e-3, max_length=512, curvature_examples=16, batch_size=16, curvature_use="direct"),
    )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the demo; returns (and, with ``out_dir``, writes as ``demo_results.json``) the table's numbers."""
    torch.manual_seed(config.seed)
    log(f"data: MovieLens-100k → {config.n_train} train / {config.n_test} test TALLRec examples")
    splits = movielens_demo_examples(config.n_train, config.n_test + config.n_heldout, config.history_length, config.seed)
    heldout = list(splits.test[config.n_test :])  # never trained on, never scored: the trust region's own
    splits = dataclasses.replace(splits, test=list(splits.test[: config.n_test]))
    task = mixed_task(splits, config.remove_fraction, config.query_fraction, config.response_fraction, config.seed)
    log(f"model: {config.model}, LoRA r={config.lora.r} on {', '.join(config.lora.target_modules)}")
    base, tokenizer = load_base_model(config.model, seed=config.seed)
    model = attach_lora(base, config.lora)
    params = AdapterParameters.of(model)
    theta_init = params.flat()

    log(f"train: {len(task.train)} examples × {config.recipe.epochs} epochs")
    trained = train_adapter(model, tokenizer, task.train, config.recipe, progress=True)
    theta = params.flat()

    log(f"fit-curvature: {config.cache_method} on {len(task.train)} examples + step-length calibration")
    eraser = config.eraser
    start = time.perf_counter()
    cache = fit_cached_curvature(
        model, params, tokenize_examples(tokenizer, task.train, TokenizationConfig(eraser.max_length)),
        tokenizer.pad_token_id, config.cache_method, damping=eraser.damping, weight_decay=eraser.weight_decay,
        curvature=eraser.curvature, batch_size=eraser.batch_size, seed=config.seed,
        calibration_examples=config.calibration_examples, calibration_directions=config.calibration_directions,
    )
    fit_time = time.perf_counter() - start

    pairs = resolve(task.requests, task.train)
    counts = {op: sum(p.request.op == op for p in pairs) for op in ("remove", "modify_query", "correct_response")}
    log(f"erase: {counts}")
    start = time.perf_counter()
    result = erase(model, tokenizer, task.train, task.requests, eraser, curvature_cache=cache.layers,
                   calibration=cache.calibration)
    erase_time = time.perf_counter() - start
    log(f"erase with the trust region: up to {config.trust_region_steps} steps, {len(heldout)} held-out examples")
    start = time.perf_counter()
    refined = erase(model, tokenizer, task.train, task.requests,
                    dataclasses.replace(eraser, trust_region=True, trust_region_steps=config.trust_region_steps),
                    curvature_cache=cache.layers, calibration=cache.calibration, heldout=heldout)
    refine_time = time.perf_counter() - start
    removed = sum(p.new is None for p in pairs)
    plan = plan_erase(n_train=len(task.train), n_removed=removed, n_old=len(pairs), n_new=len(pairs) - removed,
                      recipe=config.recipe, cache_fitted=False, heldout=len(heldout))
    log(f"  `llmeraser erase --mode auto` would run: {plan.choice} ({plan.reason})")
    solver = result.report["solver"]
    log(f"  {solver.get('step_length_source', result.solver.status)}: step length {solver.get('step_length', float('nan')):.3g}")

    log(f"retrain: {len(task.target)} examples × {config.recipe.epochs} epochs (same recipe, seed, init; paired data order)")
    params.assign(theta_init)
    schedule = paired_schedule([e.id for e in task.train], [e.id for e in task.target], config.recipe)
    retrained = train_adapter(model, tokenizer, task.target, config.recipe, progress=True, schedule=schedule)
    theta_retrain = params.flat()
    params.assign(theta)

    edited_ids = {p.old.id for p in pairs}
    old_versions = [p.old for p in pairs]
    new_versions = [p.new for p in pairs if p.new is not None]
    rest = [e for e in task.train if e.id not in edited_ids]
    rest = [rest[i] for i in np.random.default_rng(config.seed).permutation(len(rest))[: config.rest_sample]]
    test_labels = binary_labels(splits.test)
    max_length = config.recipe.max_length

    rows = []
    for name, vector, seconds in (
        ("original", theta, trained.wall_time_s),
        ("erased", result.theta_new, erase_time),
        ("erased_tr", refined.theta_new, refine_time),
        ("retrained", theta_retrain, retrained.wall_time_s),
    ):
        params.assign(vector)
        rows.append(
            {
                "adapter": name,
                "loss_edited_old": float(example_loss_values(model, tokenizer, old_versions, max_length).mean()),
                "loss_edited_new": float(example_loss_values(model, tokenizer, new_versions, max_length).mean())
                if new_versions else float("nan"),
                "loss_rest": float(example_loss_values(model, tokenizer, rest, max_length).mean()),
                "test_auc": auc(test_labels, answer_scores(model, tokenizer, splits.test, max_length=max_length)),
                "kl_to_retrained": function_space_distance(
                    model, tokenizer, old_versions, theta_retrain, vector, max_length
                )["kl"],
                "wall_time_s": seconds,
            }
        )
    params.assign(theta)
    columns = [
        ("adapter", "adapter", ""),
        ("loss_edited_old", "loss edited (old)", ".4f"),
        ("loss_edited_new", "loss edited (new)", ".4f"),
        ("loss_rest", "loss rest of train", ".4f"),
        ("test_auc", "test AUC", ".4f"),
        ("kl_to_retrained", "KL to retrained (edited)", ".5f"),
        ("wall_time_s", "time (s)", ".1f"),
    ]
    log("")
    log(format_table(rows, columns))
    log("")
    log("time (s): training for 'original' and 'retrained', the erase call for 'erased'. "
        f"erase / retrain = {erase_time / retrained.wall_time_s:.3f} (one step), {refine_time / retrained.wall_time_s:.3f} "
        f"(trust region); fitting the curvature (once per adapter, "
        f"reused by every later erase) took {fit_time:.1f} s; peak memory {peak_memory_mb():.0f} MiB")
    summary = {
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "requests": counts,
        "rows": rows,
        "erase_report": result.report,
        "erase_time_s": erase_time,
        "trust_region_report": refined.report,
        "trust_region_time_s": refine_time,
        "auto_plan": plan.to_json(),
        "curvature_fit_time_s": fit_time,
        "curvature": {"method": config.cache_method, "fit_s": cache.fit_s,
                      "calibration": cache.calibration.to_json() if cache.calibration else None},
        "retrain_time_s": retrained.wall_time_s,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        log(f"results written to {out / 'demo_results.json'}")
    return summary
