"""``erase``: apply a request file to an adapter and write a new adapter, by ``--mode auto`` (the cheaper of
a paired retrain and the cached trust-region update), ``update`` (the influence update the solver flags
configure) or ``retrain``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import Command, _add_dry_run, _add_options
from llmeraser.cli.run_file import _given
from llmeraser.cli.shared import _add_checked_adapter, _estimate_train, _load_checked_adapter, _print_dry_run
from llmeraser.errors import InputError

# the flags that configure the influence update by hand: given any of them, erase --mode auto does as they say
SOLVER_FLAGS = ("--solver", "--curvature", "--damping", "--scaling", "--max-iters", "--tol", "--curvature-examples",
                "--curvature-use", "--probe-examples", "--auto-damping", "--curvature-cache")


def _erase(args: argparse.Namespace) -> None:
    from llmeraser.curvature import CurvatureFitConfig
    from llmeraser.data import read_examples
    from llmeraser.distributed import is_main_process
    from llmeraser.hashing import sha256_file
    from llmeraser.lifecycle import refuse_output
    from llmeraser.plan import AUTO_TRUST_REGION_STEPS, plan_erase
    from llmeraser.requests import read_requests, resolve

    started = time.perf_counter()
    requests = read_requests(args.requests)
    examples = read_examples(args.data)
    pairs = resolve(requests, examples)  # unknown or repeated ids, removing everything: refused before any model work
    _print_edits(pairs, examples)
    heldout = read_examples(args.heldout) if args.heldout else None
    refuse_output(args.out, args.adapter)
    adapter = _load_checked_adapter(args, examples, requests)
    tokenizer, recipe = adapter.tokenizer, adapter.recipe
    reproducible = recipe if adapter.record.reproducible else None  # a recipe a paired retrain can rerun

    # --mode auto: the cheaper of a paired retrain and the cached trust-region update, unless solver flags say
    configured = _given(args, SOLVER_FLAGS)
    mode, plan, cache_path = args.mode, None, None
    if mode == "auto" and configured:
        mode = "update"
        _warn_if_dearer_than_retraining(args, reproducible, examples, pairs)
    elif mode in ("auto", "retrain"):
        cache_path = Path(args.curvature_cache) if args.curvature_cache else adapter.default_curvature_path(examples)
        removed = sum(p.new is None for p in pairs)
        plan = plan_erase(n_train=len(examples), n_removed=removed, n_old=len(pairs), n_new=len(pairs) - removed,
                          recipe=reproducible, cache_fitted=(cache_path / "curvature.json").is_file(),
                          kept_examples=args.kept_examples, heldout=len(heldout or ()),
                          steps=args.steps or AUTO_TRUST_REGION_STEPS)
        if mode == "retrain" and reproducible is None:
            raise InputError("--mode retrain needs the adapter's training record (its recipe, as llmeraser train ran it)",
                             args.adapter)
        mode = "retrain" if mode == "retrain" else plan.choice
        if is_main_process():
            print(f"erase --mode {args.mode}: {mode}" + (f" ({plan.reason})" if args.mode == "auto" else ""))
    requests_sha256 = sha256_file(args.requests)
    if mode == "retrain":
        if args.dry_run:
            from llmeraser.adapter import attach_lora
            from llmeraser.requests import edited_training_set

            if is_main_process():
                _print_dry_run("erase (paired retrain)", time.perf_counter() - started,
                               lambda: _estimate_train(attach_lora(adapter.base, adapter.record.lora), tokenizer,
                                                       edited_training_set(examples, pairs), recipe))
            return
        erased = adapter.retrain(examples, requests, progress=is_main_process(), requests_sha256=requests_sha256)
        if not is_main_process():
            return
        erased.report.update({"plan": plan.to_json() if plan else None})
        erased.save(args.out)
        print(f"retrained on {len(erased.edited)} of {len(examples)} examples in the original run's data order in "
              f"{erased.report['timings_s']['retrain_s']:.1f} s; final objective {erased.report['final_objective']:.4f}")
        print(f"erased adapter written to {args.out} (report: {Path(args.out) / 'erasure_report.json'})")
        return

    cache = None
    if plan is not None:  # auto: the cached curvature (fitted now on first use) and the trust region
        from llmeraser.plan import (
            AUTO_CACHE_METHOD,
            AUTO_CALIBRATION_DIRECTIONS,
            AUTO_CALIBRATION_EXAMPLES,
            AUTO_CURVATURE_EXAMPLES,
        )

        assert cache_path is not None
        if not (cache_path / "curvature.json").is_file() and not args.dry_run:
            if is_main_process():
                print(f"fitting the {AUTO_CACHE_METHOD} curvature once for this adapter and data (kept in {cache_path})")
            adapter.fit_curvature(examples, cache_path, CurvatureFitConfig(
                method=AUTO_CACHE_METHOD, curvature_examples=AUTO_CURVATURE_EXAMPLES,
                calibration_examples=AUTO_CALIBRATION_EXAMPLES, calibration_directions=AUTO_CALIBRATION_DIRECTIONS,
                batch_size=args.batch_size, seed=args.seed))
            _wait_for_rank_zero()
        if (cache_path / "curvature.json").is_file():
            cache = adapter.load_curvature(cache_path, examples)
    elif args.curvature_cache:
        cache = adapter.load_curvature(args.curvature_cache, examples)
    calibration = cache.calibration if cache else None
    trust_region = args.trust_region if args.trust_region is not None else plan is not None
    config = adapter.erase_config(
        solver=args.solver,
        curvature=args.curvature,
        damping=(calibration.damping if plan is not None and calibration else args.damping),
        scaling=args.scaling,
        max_iters=args.max_iters,
        tol=args.tol,
        batch_size=args.batch_size,
        curvature_examples=args.curvature_examples,
        seed=args.seed,
        auto_damping=args.auto_damping,
        curvature_use="direct" if plan is not None else args.curvature_use,
        probe_examples=args.probe_examples,
        trust_region=trust_region,
        trust_region_steps=args.steps or AUTO_TRUST_REGION_STEPS,
        kept_examples=args.kept_examples,
        heldout_tolerance=args.heldout_tolerance,
        kl_budget=args.kl_budget,
    )
    if args.dry_run:
        from llmeraser.estimate import estimate_erase

        if is_main_process():
            _print_dry_run("erase", time.perf_counter() - started,
                           lambda: estimate_erase(adapter.model, tokenizer, examples, requests, config,
                                                  curvature_cache=cache.factors if cache else None,
                                                  calibration=calibration))
        return
    erased = adapter.erase(examples, requests, config, cache, heldout=heldout, progress=is_main_process(),
                           requests_sha256=requests_sha256)
    if not is_main_process():  # data-parallel run: rank 0 writes
        return
    erased.report.update({"plan": plan.to_json() if plan else None})
    erased.save(args.out)
    report_path = Path(args.out) / "erasure_report.json"
    report = erased.report
    solver = erased.result.solver
    attempts = report.get("damping_attempts") or []
    if len(attempts) > 1:
        tried = ", ".join("{:g} ({})".format(a["damping"], a["outcome"]) for a in attempts)
        print(f"auto-damping: λ = {tried}")
    if "step_length_source" in solver.details:
        fallback = solver.details.get("step_length_fallback")
        print(f"step length α = {solver.details['step_length']:.4g} ({solver.details['step_length_source']}"
              + (f": {fallback})" if fallback else ")"))
    residual = "not measured" if math.isnan(solver.final_residual) else f"{solver.final_residual:.2e}"
    print(f"requests {report['requests']}; {solver.solver}: {solver.status}, {solver.iterations} iterations, "
          f"relative residual {residual}; ‖v‖ = {report['update_norm']:.3e}; "
          f"{report['timings_s']['total_s']:.1f} s")
    region = report.get("trust_region")
    if region:
        checks = region["acceptance"]
        heldout_text = ("" if checks["heldout_loss"]["after"] is None else
                        f"; held-out loss {checks['heldout_loss']['before']:.4f} → {checks['heldout_loss']['after']:.4f}")
        removed_text = ("" if checks["removed_loss"]["after"] is None else
                        f"; removed examples' loss {checks['removed_loss']['before']:.4f} → {checks['removed_loss']['after']:.4f}")
        print(f"trust region: {len([s for s in region['steps'] if s['accepted']])} step(s) accepted, stopped: "
              f"{region['stopped']}; KL on {checks['kept_examples']} kept examples {checks['kept_kl']:.3g}"
              + heldout_text + removed_text)
    print(f"erased adapter written to {args.out} (report: {report_path})")


def _print_edits(pairs: list, examples: list) -> None:
    """Name the edited examples by the requests' ids, and warn of removed examples whose identical copy
    stays in the data under another id (the report records the same)."""
    from llmeraser.distributed import is_main_process
    from llmeraser.requests import describe_edits, duplicate_warning, remaining_duplicates

    if not is_main_process():
        return
    print(f"edited examples: {describe_edits(pairs)}")
    for duplicate in remaining_duplicates(examples, pairs):
        print(f"llmeraser: warning: {duplicate_warning(duplicate)}", file=sys.stderr)


def _warn_if_dearer_than_retraining(args: argparse.Namespace, recipe: Any, examples: list, pairs: list) -> None:
    """A configured update predicted to cost more than a paired retrain gets a warning naming both costs."""
    from llmeraser.distributed import is_main_process
    from llmeraser.eraser import DEFAULT_PROBE_EXAMPLES
    from llmeraser.plan import configured_update_cost, retrain_cost

    if recipe is None or not is_main_process():
        return
    removed = sum(p.new is None for p in pairs)
    n_curvature = min(args.curvature_examples or len(examples), len(examples) - removed)
    cost = configured_update_cost(args.solver, args.max_iters, n_curvature, len(pairs), len(pairs) - removed,
                                  cached_direct=bool(args.curvature_cache) and args.curvature_use == "direct",
                                  batch_size=args.batch_size, probe_examples=args.probe_examples or DEFAULT_PROBE_EXAMPLES)
    retrain = retrain_cost(len(examples) - removed, recipe.epochs, recipe.optimizer)
    if cost > retrain:
        print(f"llmeraser: warning: this update is predicted to cost up to {cost:,.0f} example passes, more than a "
              f"paired retrain ({retrain:,.0f}); `--mode retrain` is exact, and without solver flags `--mode auto` "
              "chooses the cheaper", file=sys.stderr)


def _wait_for_rank_zero() -> None:
    """Under torchrun: the other ranks wait until rank 0 has written what they read next."""
    from llmeraser.distributed import is_distributed

    if is_distributed():
        import torch.distributed as dist

        dist.barrier()



def _erase_flags(erase: argparse.ArgumentParser) -> None:
    from llmeraser.eraser import EraseConfig  # the flags' defaults are the library's (declared once)

    _add_checked_adapter(erase)
    erase.add_argument("--requests", required=True, help="request file, JSONL: remove / modify_query / correct_response")
    erase.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    _add_options(erase, EraseConfig, ["solver", "curvature", "damping", "scaling", "max_iters", "tol", "batch_size",
                                      "curvature_examples", "seed"])
    erase.add_argument("--curvature-cache", default=None,
                       help="a fit-curvature directory (K-FAC, EK-FAC or DataInf) for this adapter and data, used as "
                       "--curvature-use says")
    _add_options(erase, EraseConfig, ["curvature_use", "probe_examples"])
    erase.add_argument("--mode", default="auto", choices=["auto", "update", "retrain"],
                       help="auto: without solver flags, the cheaper of a paired retrain (exact) and the cached "
                       "trust-region update (EK-FAC fitted on first use and kept in the user cache), by predicted "
                       "cost; with solver flags, the update they configure. update: the influence update as the "
                       "flags say; retrain: a paired retrain with the recorded recipe")
    erase.add_argument("--heldout", default=None,
                       help="examples the adapter never saw (a data file): the trust region refuses steps that raise their "
                       "loss and stops removals at their loss level (what a retrained model shows)")
    erase.add_argument("--trust-region", action=argparse.BooleanOptionalAction, default=None,
                       help="re-linearised steps accepted by their effect in function space (default: on in --mode auto, "
                       "off for a configured update)")
    _add_options(erase, EraseConfig, ["trust_region_steps"], flags={"trust_region_steps": "--steps"},
                 defaults={"trust_region_steps": None},
                 helps={"trust_region_steps": f"trust-region steps at most (default {EraseConfig.trust_region_steps})"})
    _add_options(erase, EraseConfig, ["kept_examples", "heldout_tolerance", "kl_budget", "auto_damping"])
    _add_dry_run(erase, "erasure (prepare, gradients, solve, save)")


ERASE = Command("erase", "apply a request file to an adapter and write a new adapter (the input is never modified)",
                _erase_flags, _erase)
