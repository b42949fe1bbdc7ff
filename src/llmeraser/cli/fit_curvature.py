"""``fit-curvature``: fit a curvature approximation of an adapter's LoRA layers once (a registered method:
``llmeraser.curvature.registry``), with its step length calibrated, for fast erasures."""

from __future__ import annotations

import argparse
import math
import time

from llmeraser.cli.flags import Command, _add_dry_run, _add_dtype, _add_loss_scope, _add_model, _add_record_recipe
from llmeraser.cli.shared import _load_checked_adapter, _print_dry_run, _refuse_existing
from llmeraser.errors import ConfigError


def _fit_curvature(args: argparse.Namespace) -> None:
    from llmeraser.curvature import CurvatureFitConfig, curvature_methods, get_curvature_method
    from llmeraser.data import read_examples
    from llmeraser.distributed import is_main_process

    started = time.perf_counter()
    valid_damping = args.damping is None or (args.damping >= 0 and math.isfinite(args.damping))
    if not valid_damping or (args.damping is not None and not get_curvature_method(args.method).takes_damping):
        own = " | ".join(name for name in curvature_methods() if get_curvature_method(name).takes_damping)
        raise ConfigError("damping", f"applies to `method={own}` only and must be >= 0, got {args.damping}")
    _check_calibration_flags(args)
    examples = read_examples(args.data)
    _refuse_existing(args.out)
    adapter = _load_checked_adapter(args, examples)
    recipe = adapter.recipe
    settings = CurvatureFitConfig(
        method=args.method, curvature_examples=args.curvature_examples, calibration_examples=args.calibration_examples,
        calibration_directions=args.calibration_directions, calibration_damping=args.calibration_damping,
        batch_size=args.batch_size, seed=args.seed, datainf_damping=args.damping)
    if args.dry_run:
        from llmeraser.estimate import estimate_fit_curvature

        if is_main_process():
            _print_dry_run("fit-curvature", time.perf_counter() - started, lambda: estimate_fit_curvature(
                adapter.model, adapter.tokenizer, examples, args.method, batch_size=args.batch_size, seed=args.seed,
                max_length=recipe.max_length, loss_scope=recipe.loss_scope, curvature_examples=args.curvature_examples,
                damping=args.damping, calibration_examples=args.calibration_examples,
                calibration_directions=args.calibration_directions, calibration_damping=args.calibration_damping,
                weight_decay=recipe.weight_decay,
            ))
        return
    cache = adapter.fit_curvature(examples, args.out, settings)
    metadata, factors, calibration = cache.metadata, cache.factors, cache.calibration
    if not is_main_process():  # data-parallel run: rank 0 writes
        return
    what = get_curvature_method(args.method).summary
    print(f"{what} of {len(factors)} LoRA layers fitted on {metadata.n_examples} examples in {cache.fit_s:.1f} s")
    if calibration:
        print(f"step length α = {calibration.step_length:.4g} (median of {calibration.n_directions}, range "
              f"{min(calibration.step_lengths):.3g}–{max(calibration.step_lengths):.3g}) calibrated on "
              f"{calibration.n_examples} examples at damping + weight decay = {calibration.shift:g} in "
              f"{calibration.time_s:.1f} s; erase --curvature-use direct with --damping {calibration.damping:g} uses it")
    print(f"curvature written to {args.out}")


def _check_calibration_flags(args: argparse.Namespace) -> None:
    """Usage errors (exit 2) in fit-curvature's calibration flags (``CurvatureFitConfig`` declares no bounds)."""
    checks = [
        ("calibration_examples", args.calibration_examples, args.calibration_examples >= 0, ">= 0"),
        ("calibration_directions", args.calibration_directions, args.calibration_directions >= 1, ">= 1"),
        ("calibration_damping", args.calibration_damping,
         args.calibration_damping >= 0 and math.isfinite(args.calibration_damping), ">= 0"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ConfigError(name, f"must be {expected}, got {value}")



def _fit_curvature_flags(fit: argparse.ArgumentParser) -> None:
    from llmeraser.curvature import CurvatureFitConfig, curvature_methods, get_curvature_method

    fit_defaults = CurvatureFitConfig()
    _add_model(fit, required=False)
    fit.add_argument("--adapter", required=True, help="PEFT adapter directory")
    fit.add_argument("--data", required=True, help="the training data the adapter was trained on (.jsonl, .json, .csv/.tsv, .parquet)")
    fit.add_argument("--out", required=True, help="new curvature directory (must not exist)")
    fit.add_argument("--curvature-examples", type=int, default=fit_defaults.curvature_examples, help="fit on a random subset of this many examples (default: all)")
    fit.add_argument("--batch-size", type=int, default=fit_defaults.batch_size, help="examples per forward pass")
    _add_record_recipe(fit, ["max_length"])
    _add_loss_scope(fit)
    fit.add_argument("--seed", type=int, default=fit_defaults.seed, help="seed of the subset and of the sampled labels")
    fit.add_argument("--method", default=fit_defaults.method, choices=curvature_methods(),
                     help="; ".join(f"{name}{' (default)' if name == fit_defaults.method else ''}: "
                                    f"{get_curvature_method(name).help}"
                                    for name in sorted(curvature_methods(), key=lambda m: m != fit_defaults.method)))
    fit.add_argument("--damping", type=float, default=None,
                     help="datainf only: λ_l of every layer (default: DataInf's 0.1 · mean ‖g_i‖² / d_l)")
    fit.add_argument("--calibration-examples", type=int, default=fit_defaults.calibration_examples,
                     help="fit the step length α of erase --curvature-use direct against the exact Gauss-Newton operator "
                     "on this many random examples (0: no calibration; erase then fits α on its probe examples)")
    fit.add_argument("--calibration-directions", type=int, default=fit_defaults.calibration_directions,
                     help="α is the median over the per-example loss gradients of this many random examples")
    fit.add_argument("--calibration-damping", type=float, default=fit_defaults.calibration_damping,
                     help="the damping λ of the calibration: erase uses the calibrated α when its --damping + weight "
                     "decay equal this + --weight-decay")
    _add_record_recipe(fit, ["weight_decay"])
    fit.add_argument("--allow-mismatch", action="store_true", help="proceed although base model or data differ from the adapter's record")
    _add_dtype(fit)
    _add_dry_run(fit, "fit (load, tokenise, fit, step-length calibration, save)")


FIT_CURVATURE = Command("fit-curvature", "fit a curvature approximation of an adapter's LoRA layers once, for fast erasures",
                        _fit_curvature_flags, _fit_curvature)
