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

from llmeraser.cli.flags import Command, _add_dry_run, _add_options, _spell
from llmeraser.cli.shared import _add_checked_adapter, _load_checked_adapter, _print_dry_run


def _erase(args: argparse.Namespace) -> None:
    from llmeraser.data import read_examples
    from llmeraser.distributed import is_main_process
    from llmeraser.hashing import sha256_file
    from llmeraser.lifecycle import refuse_output
    from llmeraser.requests import read_requests, resolve

    started = time.perf_counter()
    requests = read_requests(args.requests)
    examples = read_examples(args.data)
    pairs = resolve(requests, examples)  # unknown or repeated ids, removing everything: refused before any model work
    _print_edits(pairs, examples)
    heldout = read_examples(args.heldout) if args.heldout else None
    refuse_output(args.out, args.adapter)
    adapter = _load_checked_adapter(args, examples, requests)
    # one plan for the dry run and the real run: what --mode and the solver flags resolve to
    plan = adapter.plan_erase(examples, requests, mode=args.mode, options=_erase_options(args),
                              curvature_cache=args.curvature_cache, heldout=heldout)
    if is_main_process():
        if plan.choice is not None:  # the mode (or the cost comparison) decided, not solver flags
            print(plan.summary())
        if plan.warning:
            print(f"llmeraser: warning: {_spell(plan.warning)}", file=sys.stderr)
    if args.dry_run:
        if is_main_process():
            _print_dry_run("erase", time.perf_counter() - started,
                           lambda: adapter.estimate_plan(plan, examples, requests, heldout=heldout))
        return
    erased = adapter.run_plan(plan, examples, requests, heldout=heldout, progress=is_main_process(),
                              requests_sha256=sha256_file(args.requests))
    if not is_main_process():  # data-parallel run: rank 0 writes
        return
    erased.save(args.out)
    if plan.mode == "retrain":
        print(f"retrained on {len(erased.edited)} of {len(examples)} examples in the original run's data order in "
              f"{erased.report['timings_s']['retrain_s']:.1f} s; final objective {erased.report['final_objective']:.4f}")
        print(f"erased adapter written to {args.out} (report: {Path(args.out) / 'erasure_report.json'})")
        return
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
        removed = checks["removed_loss"]
        removed_text = ("" if removed["after"] is None else
                        f"; removed examples' loss {removed['before']:.4f} → {removed['after']:.4f}")
        sharing = checks["heldout_loss"].get("sharing_removed_content", 0)
        if sharing and removed["never_seen_level"] is not None:
            removed_text += (f" (never-seen level {removed['never_seen_level']:.4f}, from the {sharing} held-out "
                             "example(s) whose answers share text only the removed examples have)")
        refit = checks.get("refit", {})
        if refit.get("steps"):
            removed_text += (f"; {refit['steps']} refit step(s) on the retraining objective"
                             + (f", the removed examples' loss held above {refit['removed_floor']:.4f}"
                                if refit.get("removed_floor") is not None else "")
                             + (f", the kept examples' loss not below θ̂'s {refit['kept_level']:.4f} (− tolerance)"
                                if refit.get("kept_level") is not None else ""))
        followed = checks.get("bounds_followed") or {}
        if any(followed.values()):
            removed_text += ("; steps turned along " + ", ".join(
                f"{label} {followed[key]}×" for key, label in (("heldout_guard", "the held-out guard"),
                                                                ("replacements_floor", "the replacements' floor"))
                if followed.get(key)))
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


def _erase_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EraseConfig`` fields given on the command line or in ``--config`` (the others keep the library's
    defaults; the recipe's values went to ``Adapter.load``), as ``Adapter.plan_erase`` takes them."""
    from llmeraser.eraser import EraseConfig
    from llmeraser.lifecycle import RECIPE_FIELDS

    options = {name: getattr(args, dest) for cls, name, dest in args.declared
               if cls is EraseConfig and dest in args.given and name not in RECIPE_FIELDS}
    if args.trust_region is not None:
        options["trust_region"] = args.trust_region
    return options


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
    _add_options(erase, EraseConfig, ["kept_examples", "heldout_tolerance", "kept_tolerance", "kl_budget",
                                      "trust_region_memory", "trust_region_refit_steps", "trust_region_refit_kept_level",
                                      "trust_region_follow_bounds",
                                      "auto_damping"])
    _add_dry_run(erase, "erasure (prepare, gradients, solve, save)")


ERASE = Command("erase", "apply a request file to an adapter and write a new adapter (the input is never modified)",
                _erase_flags, _erase)
