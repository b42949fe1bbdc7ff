"""``fit-curvature``: fit a curvature approximation of an adapter's LoRA layers once (a registered method:
``llmeraser.curvature.registry``), with its step length calibrated, for fast erasures."""

from __future__ import annotations

import argparse
import time

from llmeraser.cli.flags import Command, _add_dry_run, _add_options
from llmeraser.cli.shared import _add_checked_adapter, _load_checked_adapter, _print_dry_run, _refuse_existing

# CurvatureFitConfig's fields, as fit-curvature's flags (datainf_damping: --damping)
_FIT_FIELDS = ("method", "datainf_damping", "curvature_examples", "batch_size", "seed", "calibration_examples",
               "calibration_directions", "calibration_damping")


def _fit_curvature(args: argparse.Namespace) -> None:
    from llmeraser.curvature import CurvatureFitConfig, get_curvature_method
    from llmeraser.data import read_examples
    from llmeraser.distributed import is_main_process

    started = time.perf_counter()
    # validated before any file is read (--damping only for a method that takes one)
    settings = CurvatureFitConfig(**{name: getattr(args, "damping" if name == "datainf_damping" else name)
                                     for name in _FIT_FIELDS})
    examples = read_examples(args.data)
    _refuse_existing(args.out)
    adapter = _load_checked_adapter(args, examples)
    recipe = adapter.recipe
    if args.dry_run:
        from llmeraser.estimate import estimate_fit_curvature

        if is_main_process():
            _print_dry_run("fit-curvature", time.perf_counter() - started, lambda: estimate_fit_curvature(
                adapter.model, adapter.tokenizer, examples, settings.method, batch_size=settings.batch_size,
                seed=settings.seed, max_length=recipe.max_length, loss_scope=recipe.loss_scope,
                curvature_examples=settings.curvature_examples, damping=settings.datainf_damping,
                calibration_examples=settings.calibration_examples, calibration_directions=settings.calibration_directions,
                calibration_damping=settings.calibration_damping, weight_decay=recipe.weight_decay,
            ))
        return
    cache = adapter.fit_curvature(examples, args.out, settings)
    metadata, layers, calibration = cache.metadata, cache.layers, cache.calibration
    if not is_main_process():  # data-parallel run: rank 0 writes
        return
    what = get_curvature_method(settings.method).summary
    print(f"{what} of {len(layers)} LoRA layers fitted on {metadata.n_examples} examples in {cache.fit_s:.1f} s")
    if calibration:
        print(f"step length α = {calibration.step_length:.4g} (median of {calibration.n_directions}, range "
              f"{min(calibration.step_lengths):.3g}–{max(calibration.step_lengths):.3g}) calibrated on "
              f"{calibration.n_examples} examples at damping + weight decay = {calibration.shift:g} in "
              f"{calibration.time_s:.1f} s; erase --curvature-use direct with --damping {calibration.damping:g} uses it")
    print(f"curvature written to {args.out}")


def _fit_curvature_flags(fit: argparse.ArgumentParser) -> None:
    from llmeraser.curvature import CurvatureFitConfig, curvature_methods, get_curvature_method

    default = CurvatureFitConfig().method
    methods = "; ".join(f"{name}{' (default)' if name == default else ''}: {get_curvature_method(name).help}"
                        for name in sorted(curvature_methods(), key=lambda m: m != default))
    _add_checked_adapter(fit)
    fit.add_argument("--out", required=True, help="new curvature directory (must not exist)")
    _add_options(fit, CurvatureFitConfig, _FIT_FIELDS, flags={"datainf_damping": "--damping"}, helps={"method": methods})
    _add_dry_run(fit, "fit (load, tokenise, fit, step-length calibration, save)")


FIT_CURVATURE = Command("fit-curvature", "fit a curvature approximation of an adapter's LoRA layers once, for fast erasures",
                        _fit_curvature_flags, _fit_curvature)
