"""The ``llmeraser`` command: a thin shell over the library.

Subcommands: ``train``, ``erase``, ``retrain``, ``evaluate``, ``demo``, ``make-data``, ``history``,
``apply-requests``. Every option can also come from a
TOML file (``--config run.toml``: top-level keys, or a table named after the subcommand; keys spelled as
the flags, with ``-`` or ``_``); flags given on the command line override the file.

Exit codes: 0 success, 2 usage error, 3 bad input (files, ids, mismatched adapters), 4 numerical failure,
5 no space left for the output (disk full or quota exceeded), 130 interrupted (Ctrl-C). On 3, 4, 5 and 130
nothing is written. Only llmeraser's own errors (``llmeraser.errors``) get these codes: any other exception is
a bug, shown with its traceback (exit 1).

The flags of the options a config dataclass declares (``EraseConfig``, ``TrainConfig``, ``LoraSettings``)
are generated from the declaration (``_add_options``); a ``ConfigError`` names the field, shown as its flag.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

from llmeraser.distributed import init_from_environment, shutdown
from llmeraser.errors import ConfigError, InputError, NumericalError, OutputSpaceError, is_out_of_space
from llmeraser.models import DTYPES

EXIT_USAGE, EXIT_INPUT, EXIT_NUMERICAL, EXIT_NO_SPACE = 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


# ----------------------------------------------------------------------------------------------- commands


def _bench(args: argparse.Namespace) -> None:
    from llmeraser_bench import BenchConfig, finish, quick_config, render_text, run_bench, write_results
    from llmeraser_bench.protocol import next_item_config, pii_config

    if args.task == "pii":
        config = pii_config(quick=args.quick)
    elif args.task == "next-item":
        config = next_item_config(quick=args.quick)
    else:
        config = quick_config(args.task) if args.quick else BenchConfig(task=args.task)
    eraser = replace(config.eraser, **{k: v for k, v in {
        "solver": args.solver, "max_iters": args.max_iters, "curvature_examples": args.curvature_examples,
        "damping": args.damping}.items() if v is not None})
    recipe = replace(config.recipe, epochs=args.epochs) if args.epochs else config.recipe
    config = replace(config, eraser=eraser, recipe=recipe, data=args.data, format=args.format, **{k: v for k, v in {
        "ratios": tuple(args.ratio) if args.ratio else None, "model": args.model,
        "seeds": tuple(range(args.seeds)) if args.seeds else None,
        "methods": tuple(args.methods) if args.methods else None,
        "n_train": args.n_train, "n_test": args.n_test, "cache_method": args.cache_method,
        "removal_unit": args.removal_unit, "trust_region_steps": args.trust_region_steps, "query_mode": args.query_mode,
        "relearn_steps": args.relearn_steps,
        "quantise_bits": tuple(args.quantise_bits) if args.quantise_bits is not None else None}.items() if v is not None})
    try:
        config.validate()
    except ValueError as error:
        raise InputError(str(error)) from None
    def checkpoint(partial: dict[str, Any]) -> None:  # what an interrupted run has measured stays on disk
        write_results(finish(partial), args.out)

    results = finish(run_bench(config, command=args.command_line, checkpoint=checkpoint))
    print(render_text(results))
    for path in write_results(results, args.out):
        print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    from llmeraser_bench.demo import DemoConfig, run_demo, tiny_demo_config

    config = tiny_demo_config() if args.model == "tiny" else replace(DemoConfig(), model=args.model)
    run_demo(replace(config, seed=args.seed), out_dir=args.out)


def _lora_settings(args: argparse.Namespace) -> Any:
    from llmeraser.adapter import LoraSettings

    return LoraSettings(args.lora_r, args.lora_alpha, 0.0, tuple(args.target_modules), args.seed)


def _recipe(args: argparse.Namespace) -> Any:
    from llmeraser.train import TrainConfig

    return TrainConfig(args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed, args.max_length,
                       args.optimizer, args.lr_schedule, args.loss_scope)


def _train_and_save(
    model_name: str,
    examples: list,
    lora: Any,
    recipe: Any,
    out: str,
    extra: dict | None = None,
    trust_remote_code: bool = False,
    data_path: str | None = None,
    requests: Sequence[Any] = (),
    command: str = "train",
    dry_run: bool = False,
    dtype: str = "float32",
    schedule: Any = None,
) -> None:
    """Fresh LoRA on the base model (loaded in ``dtype``; the adapter is float32), trained with ``recipe``
    (on ``schedule``'s mini-batches when given: a paired retrain), saved with its training record and the
    first entry of its lineage. ``dry_run``: print the estimated time and memory instead (writes nothing).
    Under torchrun the ranks train data-parallel and rank 0 writes."""
    started = time.perf_counter()
    from llmeraser.adapter import attach_lora, save_adapter
    from llmeraser.distributed import is_main_process
    from llmeraser.hashing import adapter_hash, combine_parts, dataset_hash, fingerprint_parts
    from llmeraser.lifecycle import chat_template_hash
    from llmeraser.lineage import LINEAGE_FILE, append_entry, lineage_text, train_entry
    from llmeraser.models import load_base_model
    from llmeraser.provenance import TRAINING_RECORD, TrainingRecord
    from llmeraser.train import train_adapter
    from llmeraser.validate import check_examples_fit, check_max_length

    _refuse_existing(out)
    base, tokenizer = load_base_model(model_name, seed=recipe.seed, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    check_max_length(recipe.max_length, base)
    truncated = check_examples_fit(tokenizer, examples, recipe.max_length, data_path, requests, base, recipe.loss_scope)
    _print_truncation(truncated, len(examples), recipe.max_length)
    parts = fingerprint_parts(base, lora.target_modules)
    record = TrainingRecord(model_name, combine_parts(parts), dataset_hash(examples), len(examples), recipe, lora,
                            parts, chat_template_sha256=chat_template_hash(tokenizer))
    model = attach_lora(base, lora)
    if dry_run:
        if is_main_process():
            _print_dry_run(command, time.perf_counter() - started, lambda: _estimate_train(model, tokenizer, examples, recipe))
        return
    result = train_adapter(model, tokenizer, examples, recipe, progress=is_main_process(), schedule=schedule)
    if result.losses and not math.isfinite(result.losses[-1]):
        raise NumericalError(f"the training objective is {result.losses[-1]} (lower --lr)", stage="train")
    if not is_main_process():  # data-parallel run: rank 0 writes
        return
    record_json = {**record.to_json(), **(extra or {})}

    def files(written: Path) -> dict[str, Any]:
        entry = train_entry(
            command, model_name, record.model_fingerprint, record.data_sha256, record.n_examples,
            record_json["recipe"], record_json["lora"], adapter_hash(written),
            {"steps": result.steps, "final_objective": result.losses[-1] if result.losses else None},
        )
        return {TRAINING_RECORD: record_json, LINEAGE_FILE: lineage_text(append_entry([], entry))}

    save_adapter(model, out, extra_files=files)
    print(f"trained on {len(examples)} examples in {result.wall_time_s:.1f} s; final objective {result.losses[-1]:.4f}")
    print(f"adapter written to {out}")


def _print_truncation(truncated: int, n_examples: int, max_length: int) -> None:
    """Say once on the console how many examples are cut to ``max_length`` (and from which side)."""
    from llmeraser.distributed import is_main_process
    from llmeraser.validate import truncation_note

    note = truncation_note(truncated, n_examples, max_length)
    if note and is_main_process():
        print(_spell(note))


def _refuse_existing(out: str) -> None:
    if Path(out).exists():
        raise InputError("output directory already exists (choose a new one; nothing is overwritten)", out)


def _train(args: argparse.Namespace) -> None:
    from llmeraser.data import read_examples

    _train_and_save(args.model, read_examples(args.data), _lora_settings(args), _recipe(args), args.out,
                    trust_remote_code=args.trust_remote_code, data_path=args.data, dry_run=args.dry_run,
                    dtype=args.dtype)


def _estimate_train(model: Any, tokenizer: Any, examples: list, recipe: Any) -> Any:
    from llmeraser.estimate import estimate_train

    return estimate_train(model, tokenizer, examples, recipe)


def _print_dry_run(command: str, load_s: float, estimate: Any) -> None:
    """``--dry-run``: the estimate table (load and checks as measured, then ``estimate()``'s stages)."""
    from llmeraser.estimate import measured_stage

    loaded = measured_stage("load and checks", load_s)
    start = time.perf_counter()
    result = estimate()
    result.stages.insert(0, loaded)
    result.notes.append(f"this dry run took {load_s + time.perf_counter() - start:.1f} s")
    print(_spell(result.table()))


def _load_for_adapter(
    model_arg: str | None, adapter: str, trust_remote_code: bool = False, dtype: str = "float32"
) -> tuple[Any, Any, Any, Any]:
    """(model with the adapter loaded, tokenizer, base, training record) for an existing adapter (``evaluate``);
    the base model in ``dtype`` (from ``--model``, the training record or ``adapter_config.json``), the
    adapter float32."""
    from llmeraser.adapter import load_adapter
    from llmeraser.lifecycle import base_model_name, require_adapter
    from llmeraser.models import load_base_model
    from llmeraser.provenance import read_training_record

    require_adapter(adapter)
    record = read_training_record(adapter)
    name = base_model_name(model_arg, record, adapter)
    base, tokenizer = load_base_model(name, seed=record.recipe.seed if record else 0, dtype=DTYPES[dtype],
                                      trust_remote_code=trust_remote_code)
    return load_adapter(base, adapter), tokenizer, base, record


def _load_checked_adapter(args: argparse.Namespace, examples: list, requests: Sequence[Any] = ()) -> Any:
    """``Adapter.load`` with the flags (base model, recipe values, dtype, mismatches allowed), then
    ``Adapter.check`` of ``--data``: what ``erase`` and ``fit-curvature`` share."""
    from llmeraser.lifecycle import Adapter

    adapter = Adapter.load(args.adapter, args.model, weight_decay=args.weight_decay, max_length=args.max_length,
                           loss_scope=args.loss_scope, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                           allow_mismatch=args.allow_mismatch)
    adapter.check(examples, args.data, requests)
    _print_truncation(adapter.truncated, len(examples), adapter.recipe.max_length)
    return adapter


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
    metadata, factors, calibration = cache.metadata, cache.layers, cache.calibration
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


def _retrain(args: argparse.Namespace) -> None:
    from llmeraser.data import read_examples
    from llmeraser.distributed import is_main_process
    from llmeraser.provenance import read_training_record
    from llmeraser.requests import edited_training_set, read_requests, resolve
    from llmeraser.train import paired_schedule

    examples = read_examples(args.data)
    requests = read_requests(args.requests)
    edited = edited_training_set(examples, resolve(requests, examples))
    if args.like:
        record = read_training_record(args.like)
        if record is None:
            raise InputError("no llmeraser training record to copy the recipe from", args.like)
        if not record.reproducible:
            raise InputError(f"its training record is {record.origin!r}, not a recipe llmeraser train ran: give "
                             "--model and the recipe flags instead of --like", args.like)
        model_name, lora, recipe = args.model or record.model, record.lora, record.recipe
    else:
        if not args.model:
            raise InputError("retrain needs --model (or --like ADAPTER_DIR to copy model and recipe)")
        model_name, lora, recipe = args.model, _lora_settings(args), _recipe(args)
    # paired with the original run: its data order with the edited examples removed or substituted in place
    schedule = paired_schedule([e.id for e in examples], [e.id for e in edited], recipe) if recipe.optimizer == "adam" else None
    if is_main_process():
        print(f"retraining on the edited set: {len(edited)} of {len(examples)} examples"
              + (", in the original run's data order (paired)" if schedule is not None else ""))
    _train_and_save(model_name, edited, lora, recipe, args.out, trust_remote_code=args.trust_remote_code,
                    data_path=args.data, requests=requests, command="retrain", dtype=args.dtype, schedule=schedule)


def _evaluate(args: argparse.Namespace) -> None:
    from llmeraser.adapter import AdapterParameters, adapter_vector
    from llmeraser.data import read_examples
    from llmeraser.evaluate import (
        evaluate_examples,
        example_loss_values,
        function_space_distance,
    )
    from llmeraser.hashing import example_hash
    from llmeraser.requests import read_requests, resolve
    from llmeraser.validate import check_examples_fit

    examples = read_examples(args.data)
    model, tokenizer, _, record = _load_for_adapter(args.model, args.adapter, args.trust_remote_code, args.dtype)
    max_length = args.max_length or (record.recipe.max_length if record else 256)
    scope = args.loss_scope or (record.recipe.loss_scope if record else "response")
    if record is None and (args.max_length is None or args.loss_scope is None):
        from llmeraser.lifecycle import note

        note(f"{args.adapter} has no llmeraser training record: evaluating with --max-length {max_length} "
             f"--loss-scope {scope} (pass them to say otherwise)")
    _print_truncation(check_examples_fit(tokenizer, examples, max_length, args.data, (), model, scope),
                      len(examples), max_length)
    params = AdapterParameters.of(model)
    theta = params.flat()
    results: dict[str, Any] = {"adapter": args.adapter, "data": args.data}
    results["data_metrics"] = evaluate_examples(model, tokenizer, examples, max_length, args.batch_size, scope)
    rows = [("data", results["data_metrics"])]
    edited_old, edited_new = [], []
    if args.requests:
        train = read_examples(args.train_data) if args.train_data else examples
        pairs = resolve(read_requests(args.requests), train)
        edited_old = [p.old for p in pairs]
        edited_new = [p.new for p in pairs if p.new is not None]
        old_losses = example_loss_values(model, tokenizer, edited_old, max_length, args.batch_size, scope)
        new_losses: Iterable[float] = (example_loss_values(model, tokenizer, edited_new, max_length, args.batch_size, scope)
                                       if edited_new else [])
        new_iter = iter(new_losses)
        results["edited_examples"] = [  # loss_old / loss_new: on the example's old and new version, this adapter
            {"id": p.request.id, "id_sha256": example_hash(p.old)[:16], "op": p.request.op, "loss_old": float(old),
             "loss_new": float(next(new_iter)) if p.new is not None else None}
            for p, old in zip(pairs, old_losses)
        ]
        rows.append(("edited (old versions)", evaluate_examples(model, tokenizer, edited_old, max_length, args.batch_size, scope)))
        if edited_new:
            rows.append(("edited (new versions)", evaluate_examples(model, tokenizer, edited_new, max_length, args.batch_size, scope)))
    comparisons = []
    for other in args.compare or []:
        theta_other = adapter_vector(model, other)
        entry: dict[str, Any] = {"adapter": other}
        entry["data"] = function_space_distance(model, tokenizer, examples, theta_other, theta, max_length, args.batch_size, scope)
        if edited_old:
            entry["edited_old"] = function_space_distance(model, tokenizer, edited_old, theta_other, theta, max_length, args.batch_size, scope)
        if edited_new:
            entry["edited_new"] = function_space_distance(model, tokenizer, edited_new, theta_other, theta, max_length, args.batch_size, scope)
        comparisons.append(entry)
    results["compare"] = comparisons

    print(f"adapter {args.adapter} on {args.data}")
    print(_table(["set", "n", "mean loss", "perplexity", "accuracy", "AUC"],
                 [[name, int(m["n"]), m["mean_loss"], m["perplexity"], m.get("accuracy", "-"), m.get("auc", "-")]
                  for name, m in rows]))
    if results.get("edited_examples"):
        print("edited examples (this adapter's loss on the version in the training data, and on the version the "
              "request gives; - for a removal):")
    for edited in results.get("edited_examples", []):
        new = "-" if edited["loss_new"] is None else f"{edited['loss_new']:.4f}"
        print(f"  {edited['op']:<17} {edited['id']} (sha256 {edited['id_sha256']}…): loss on old version "
              f"{edited['loss_old']:.4f}, on new version {new}")
    if comparisons:
        print("function-space distance from each --compare adapter (KL(other ‖ this), nats/token; top-1 agreement):")
        table_rows = []
        for entry in comparisons:
            for key in ("data", "edited_old", "edited_new"):
                if key in entry:
                    table_rows.append([entry["adapter"], key, entry[key]["kl"], entry[key]["top1_agreement"]])
        print(_table(["other adapter", "on", "KL", "top-1 agreement"], table_rows))
    if args.json:
        from llmeraser.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")


def _history(args: argparse.Namespace) -> None:
    """Print an adapter's lineage and verify its chain; a broken chain is an input error (exit 3)."""
    from llmeraser.lifecycle import require_adapter
    from llmeraser.lineage import LINEAGE_FILE, describe, verify_adapter

    require_adapter(args.adapter)
    if not (Path(args.adapter) / LINEAGE_FILE).is_file():
        raise InputError(f"no {LINEAGE_FILE}: this adapter was not written by llmeraser (or its lineage was removed)",
                         args.adapter)
    entries, problems = verify_adapter(args.adapter)
    if args.json:
        print(json.dumps({"adapter": args.adapter, "entries": entries, "problems": problems}, indent=2))
    else:
        print(f"lineage of {args.adapter}: {len(entries)} entries")
        for entry in entries:
            print(describe(entry))
    if problems:
        raise InputError(f"lineage does not verify ({len(problems)} problem(s)):\n  " + "\n  ".join(problems),
                         Path(args.adapter) / LINEAGE_FILE)
    if not args.json:
        print(f"chain verified: {len(entries)} entries linked by SHA-256; the last one matches the adapter's weights")


def _apply_requests(args: argparse.Namespace) -> None:
    """Write the training set after one or more request files, applied in order (for sequential erasure)."""
    from llmeraser.data import Example, read_examples, write_examples
    from llmeraser.hashing import dataset_hash
    from llmeraser.requests import edited_training_set, read_requests, resolve

    if Path(args.out).exists():
        raise InputError("output file already exists (choose a new one; nothing is overwritten)", args.out)
    examples = read_examples(args.data)
    current: list[Example] = examples
    for path in args.requests:
        current = edited_training_set(current, resolve(read_requests(path), current))
    write_examples(args.out, current)
    print(f"{len(current)} of {len(examples)} examples after {len(args.requests)} request file(s); "
          f"sha256 {dataset_hash(current)} (the data_sha256 an erased adapter records)")
    print(f"written to {args.out}")


def _make_data(args: argparse.Namespace) -> None:
    from llmeraser.data import write_examples
    from llmeraser_bench.recsys.corruption import make_task, mixed_task, write_task
    from llmeraser_bench.recsys.ratings import default_ml100k_path, load_ratings
    from llmeraser_bench.recsys.tallrec import (
        TallRecConfig,
        build_records,
        splits_from_records,
        subsample_records,
    )

    _refuse_existing(args.out)
    path = default_ml100k_path() if args.data == "ml-100k" else Path(args.data)
    ratings = load_ratings(path, args.format)
    config = TallRecConfig(history_length=args.history_length, seed=args.seed)
    counts = {"train": args.n_train, "valid": args.n_test, "test": args.n_test}
    splits = splits_from_records(subsample_records(build_records(ratings, config), counts, args.seed), ratings, config)
    if args.task == "mixed":
        task = mixed_task(splits, args.fraction, args.fraction, args.fraction, args.seed)
    else:
        task = make_task(splits, args.task, args.fraction, args.seed)
    out = Path(args.out)
    write_task(out, task)
    write_examples(out / "valid.jsonl", splits.valid)
    write_examples(out / "test.jsonl", splits.test)
    print(f"{ratings.name}: {len(task.train)} train ({args.task} corruption, {len(task.requests)} requests), "
          f"{len(splits.valid)} valid, {len(splits.test)} test examples")
    print(f"written to {out}: train.jsonl, requests.jsonl, valid.jsonl, test.jsonl")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


# ------------------------------------------------------------------------------------------------- parser


def _add_model(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="base model: smollm2-135m, tiny, a Hugging Face id or a local directory"
                        + ("" if required else " (default: the one recorded with the adapter)"))
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the model checkpoint (off: such models are refused)")


def _add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="precision of the base model's weights and activations (bfloat16: for GPUs); the LoRA "
                        "adapter, gradients, updates and solver state stay float32")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default shown once: `` (default: X)`` is appended unless the help already says its default
    or there is none to show (None, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str],
    *,
    prefix: str = "",
    flags: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """Flags for the fields ``names`` of the config dataclass ``cls``, from their declaration
    (``llmeraser.options``): ``--prefix-name`` (or ``flags[name]``), the type, the ``Literal`` choices, the
    default and the help (``defaults`` / ``helps`` say where the command's differ, e.g. None: from the
    adapter's record). Every value given is checked against the declaration before the command runs, and
    a ``ConfigError`` naming the field is reported with its flag."""
    from dataclasses import MISSING, fields

    from llmeraser.options import field_type

    declared = {f.name: f for f in fields(cls)}
    for name in names:
        f = declared[name]
        flag = (flags or {}).get(name, "--" + (prefix + name).replace("_", "-"))
        scalar, choices, _ = field_type(cls, name)
        if typing.get_origin(scalar) in (typing.Union, types.UnionType):  # str | tuple[str, ...]: the list form
            scalar = next(t for t in typing.get_args(scalar) if typing.get_origin(t) is tuple)
        declared_default = f.default_factory() if f.default_factory is not MISSING else f.default
        default = (defaults or {}).get(name, declared_default)
        kwargs: dict[str, Any] = {"default": default, "help": (helps or {}).get(name, f.metadata["help"]).replace("%", "%%")}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(scalar) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(scalar)[0], default=list(default) if default else default)
        elif choices is not None:
            kwargs["choices"] = list(choices)
        else:
            kwargs["type"] = scalar
        action = parser.add_argument(flag, **kwargs)
        _declared(parser).append((cls, name, action.dest))


def _declared(parser: argparse.ArgumentParser) -> list[tuple[type, str, str]]:
    """(config class, field, dest) of each of ``parser``'s flags generated by ``_add_options``."""
    if not hasattr(parser, "llmeraser_declared"):
        parser.llmeraser_declared = []  # type: ignore[attr-defined]
    return parser.llmeraser_declared  # type: ignore[attr-defined]


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{field or dest: flag} of a subcommand's parser: how its messages spell an option."""
    names = {a.dest: next(o for o in a.option_strings if o.startswith("--"))
             for a in parser._actions if any(o.startswith("--") for o in a.option_strings)}
    for _, name, dest in _declared(parser):
        if dest in names:
            names[name] = names[dest]
    return names


_OPTION = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def _as_flags(text: str, flags: dict[str, str]) -> str:
    """The options a library message names as fields (`` `damping=0.1` ``, `` `max_length` ``) spelled as this
    command's flags (``--damping 0.1``, ``--max-length``); an option the command has no flag for keeps its name."""

    def spelled(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        flag = flags.get(name)
        if flag is None:
            return match.group(0)[1:-1]
        if value is None or value == "True":
            return flag
        return f"--no-{flag[2:]}" if value == "False" else f"{flag} {value}"

    return _OPTION.sub(spelled, text)


def _config_message(err: ConfigError, flags: dict[str, str]) -> str:
    """A ``ConfigError`` as the command line reads it: its field as the flag."""
    flag = flags.get(err.field)
    if flag is None:
        return _as_flags(str(err), flags)
    if str(err) == f"{err.field} {err.message}":
        return f"{flag} {_as_flags(err.message, flags)}"
    return f"{flag}: {_as_flags(err.message, flags)}"


def _check_declared(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors (exit 2) in the values given to generated flags, before any file is read."""
    from llmeraser.options import check_field

    for cls, name, dest in _declared(parser):
        value = getattr(args, dest, None)
        if value is not None:
            check_field(cls, name, tuple(value) if isinstance(value, list) else value)


_FLAGS: dict[str, str] = {}  # the running command's _flag_names


def _spell(text: str) -> str:
    """``_as_flags`` with the running command's flags (for what the CLI prints of the library's text)."""
    return _as_flags(text, _FLAGS)


_RECORDED = "(default: the adapter's training record's)"


def _add_record_recipe(parser: argparse.ArgumentParser, names: Sequence[str], cls: type | None = None) -> None:
    """The recipe flags of a command that reads an existing adapter: default None (the training record's)."""
    from llmeraser.train import TrainConfig

    cls = cls or TrainConfig
    helps = {"weight_decay": "recipe's λ_wd (default: from the training record, else 0)",
             "max_length": "max tokens per example (default: the recipe's, else 256)",
             "loss_scope": _field_help(TrainConfig, "loss_scope") + " " + _RECORDED}
    _add_options(parser, cls, names, defaults=dict.fromkeys(names), helps={n: helps[n] for n in names})


def _field_help(cls: type, name: str) -> str:
    from llmeraser.options import field_help

    return field_help(cls, name)


def _add_loss_scope(parser: argparse.ArgumentParser) -> None:
    """``--loss-scope`` of the commands that read an existing adapter: default the training record's."""
    _add_record_recipe(parser, ["loss_scope"])


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    from llmeraser.adapter import LoraSettings
    from llmeraser.train import TrainConfig

    _add_options(parser, LoraSettings, ["r", "alpha"], prefix="lora_")
    _add_options(parser, LoraSettings, ["target_modules"])
    _add_options(parser, TrainConfig, ["epochs", "lr", "batch_size", "weight_decay", "seed", "max_length",
                                       "lr_schedule", "loss_scope", "optimizer"])


def _add_dry_run(parser: argparse.ArgumentParser, stages: str) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help=f"check the inputs, load the model, print the estimated time and peak memory of the {stages} "
                        "and stop: an estimate from a few timed probe steps on batches of this data; nothing is "
                        "trained or written")


def build_parser() -> argparse.ArgumentParser:
    from llmeraser.curvature import CurvatureFitConfig, curvature_methods, get_curvature_method
    from llmeraser.eraser import EraseConfig  # the flags' defaults are the library's (declared once)
    from llmeraser.options import choices_of
    from llmeraser.trust_region import TrustRegionSettings

    fit_defaults = CurvatureFitConfig()

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="llmeraser", formatter_class=fmt,
        description="Unlearn training examples from a LoRA adapter by influence functions, without retraining.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)
        sub.add_argument("--config", default=None, help="TOML file with default values for these options")
        return sub

    demo = command("demo", "train, erase and retrain on built-in MovieLens data; print one table")
    demo.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a hub id or a local directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of data sampling, adapter init and training order")
    demo.add_argument("--out", default=None, help="directory for demo_results.json")
    demo.set_defaults(run=_demo)

    bench = command("bench", "the paper's protocol on rating data: corrupt, train, undo by LLMEraser and baselines, "
                    "compare with retraining; prints a table, writes results.json, results.md and plots")
    bench.add_argument("--task", required=True, choices=["removal", "query", "response", "pii", "next-item"],
                       help="removal / query (noisy prompts restored) / response (flipped labels corrected) on TALLRec "
                       "data; pii: the generated people-attributes question-answer scenario")
    bench.add_argument("--data", default="ml-100k", help="ml-100k (the copy in the recbole package) or a rating-data directory")
    bench.add_argument("--format", default=None, choices=["recbole", "movielens", "bookcrossing", "lastfm"],
                       help="format of --data (default: detected from the files)")
    bench.add_argument("--ratio", type=float, nargs="+", default=None, help="fraction(s) of training examples edited (default 0.05)")
    bench.add_argument("--model", default=None, help="base model (default smollm2-135m; tiny with --quick)")
    bench.add_argument("--seeds", type=int, default=None, help="number of training seeds (0, 1, …; default 3)")
    bench.add_argument("--methods", nargs="+", default=None,
                       help="subset of: original retrain llmeraser llmeraser_cached llmeraser_tr gradient_ascent finetune sisa (default: the task's)")
    bench.add_argument("--n-train", type=int, default=None, help="training examples")
    bench.add_argument("--n-test", type=int, default=None, help="test examples")
    bench.add_argument("--epochs", type=int, default=None, help="training epochs of the recipe")
    bench.add_argument("--solver", default=None, choices=list(choices_of(EraseConfig, "solver")), help="LLMEraser's solver")
    bench.add_argument("--max-iters", type=int, default=None, help="LLMEraser's solver iterations")
    bench.add_argument("--curvature-examples", type=int, default=None, help="examples for LLMEraser's curvature")
    bench.add_argument("--damping", type=float, default=None, help="LLMEraser's damping λ")
    bench.add_argument("--cache-method", default=None, choices=curvature_methods(),
                       help="curvature fitted once for llmeraser_cached (default ekfac)")
    bench.add_argument("--removal-unit", default=None, choices=["example", "user"],
                       help="removal task: remove --ratio of the examples, or every example of --ratio of the users")
    bench.add_argument("--trust-region-steps", type=int, default=None,
                       help=f"llmeraser_tr's steps at most (default: the task's, {TrustRegionSettings.steps} in the full protocol)")
    bench.add_argument("--query-mode", default=None, choices=["replace", "delete"],
                       help="next-item task: noisy history items restored (replace, default) or history items deleted (delete)")
    bench.add_argument("--relearn-steps", type=int, default=None, help="steps of the relearning attack (default 5; 0: not run)")
    bench.add_argument("--quantise-bits", type=int, nargs="*", default=None,
                       help="bit widths of the quantisation check (default 8 4; none given: not run)")
    bench.add_argument("--quick", action="store_true", help="the tiny random-init model and a few dozen examples (seconds)")
    bench.add_argument("--out", required=True, help="output directory for results.json, results.md and the PNG plots")
    bench.set_defaults(run=_bench)

    train = command("train", "LoRA fine-tuning on a data file; records recipe, base model and data hash")
    _add_model(train, required=True)
    train.add_argument("--data", required=True, help="training data: .jsonl, .json, .csv/.tsv or .parquet; prompt/response or conversation rows")
    train.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    _add_recipe(train)
    _add_dtype(train)
    _add_dry_run(train, "training")
    train.set_defaults(run=_train)

    erase = command("erase", "apply a request file to an adapter and write a new adapter (the input is never modified)")
    _add_model(erase, required=False)
    erase.add_argument("--adapter", required=True, help="input PEFT adapter directory")
    erase.add_argument("--data", required=True, help="the training data the adapter was trained on (.jsonl, .json, .csv/.tsv, .parquet)")
    erase.add_argument("--requests", required=True, help="request file, JSONL: remove / modify_query / correct_response")
    erase.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    _add_options(erase, EraseConfig, ["solver", "curvature", "damping", "scaling"])
    _add_record_recipe(erase, ["weight_decay"], EraseConfig)
    _add_options(erase, EraseConfig, ["max_iters", "tol", "batch_size", "curvature_examples"])
    _add_record_recipe(erase, ["max_length", "loss_scope"], EraseConfig)
    _add_options(erase, EraseConfig, ["seed"])
    erase.add_argument("--curvature-cache", default=None,
                       help="a fit-curvature directory (K-FAC, EK-FAC or DataInf) for this adapter and data, used as --curvature-use says")
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
    _add_options(erase, EraseConfig, ["kept_examples", "heldout_tolerance", "kl_budget"])
    erase.add_argument("--allow-mismatch", action="store_true", help="proceed although base model or data differ from the adapter's record")
    _add_options(erase, EraseConfig, ["auto_damping"])
    _add_dtype(erase)
    _add_dry_run(erase, "erasure (prepare, gradients, solve, save)")
    erase.set_defaults(run=_erase)

    fit = command("fit-curvature", "fit a curvature approximation of an adapter's LoRA layers once, for fast erasures")
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
    fit.set_defaults(run=_fit_curvature)

    retrain = command("retrain", "train from scratch on the edited training set with the same recipe (exact reference)")
    _add_model(retrain, required=False)
    retrain.add_argument("--data", required=True, help="the original training data (a data file)")
    retrain.add_argument("--requests", required=True, help="request file to apply to the data")
    retrain.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    retrain.add_argument("--like", default=None, help="adapter directory whose recorded model and recipe to reuse")
    _add_recipe(retrain)
    _add_dtype(retrain)
    retrain.set_defaults(run=_retrain)

    make_data = command("make-data", "TALLRec Yes/No examples from rating data, a corrupted training set and the requests that repair it")
    make_data.add_argument("--data", default="ml-100k", help="ml-100k (the copy inside the recbole package) or a directory of rating files")
    make_data.add_argument("--format", default=None, choices=["recbole", "movielens", "bookcrossing", "lastfm"],
                           help="rating file format (default: detected from the files)")
    make_data.add_argument("--task", default="mixed", choices=["removal", "query", "response", "mixed"],
                           help="removal: remove examples; query: noisy prompts to restore; response: flipped labels to correct; mixed: all three")
    make_data.add_argument("--fraction", type=float, default=0.05, help="fraction of training examples affected (per kind for mixed)")
    make_data.add_argument("--n-train", type=int, default=200, help="training examples")
    make_data.add_argument("--n-test", type=int, default=100, help="validation and test examples (each)")
    make_data.add_argument("--history-length", type=int, default=5, help="rated items listed in each prompt")
    make_data.add_argument("--seed", type=int, default=0, help="seed of sampling and corruption")
    make_data.add_argument("--out", required=True, help="new directory for the JSONL files")
    make_data.set_defaults(run=_make_data)

    evaluate = command("evaluate", "losses, perplexity, Yes/No accuracy and AUC, forgetting of edited examples, distances between adapters")
    _add_model(evaluate, required=False)
    evaluate.add_argument("--adapter", required=True, help="adapter directory to evaluate")
    evaluate.add_argument("--data", required=True, help="evaluation data (.jsonl, .json, .csv/.tsv, .parquet)")
    evaluate.add_argument("--requests", default=None, help="request file: also report each edited example's old and new loss")
    evaluate.add_argument("--train-data", default=None, help="training data the requests refer to (default: --data)")
    evaluate.add_argument("--compare", nargs="+", default=None, help="other adapter directories to measure distances to")
    evaluate.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    evaluate.add_argument("--max-length", type=int, default=None, help="max tokens per example (default: the recipe's)")
    _add_loss_scope(evaluate)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_dtype(evaluate)
    evaluate.set_defaults(run=_evaluate)

    history = command("history", "print an adapter's lineage (train and erase steps) and verify its hash chain")
    history.add_argument("adapter", help="adapter directory")
    history.add_argument("--json", action="store_true", help="print the entries and problems as JSON")
    history.set_defaults(run=_history)

    apply_requests = command("apply-requests", "write the training set as edited by request files (applied in order): "
                             "the --data for erasing again on top of an erased adapter")
    apply_requests.add_argument("--data", required=True, help="training data (any supported format; written back as JSONL)")
    apply_requests.add_argument("--requests", required=True, nargs="+", help="request file(s), applied in this order")
    apply_requests.add_argument("--out", required=True, help="new JSONL file (must not exist)")
    apply_requests.set_defaults(run=_apply_requests)
    for sub in commands.choices.values():  # the options help texts name as fields, spelled as the flags
        flags = _flag_names(sub)
        for action in sub._actions:
            if action.help:
                action.help = _as_flags(action.help, flags)
    return parser


RUN_FILE = "run.toml"
"""Written into every output directory: the command's resolved options; ``--config DIR/run.toml`` replays it."""
_NOT_REPLAYED = {"config", "out", "dry_run", "help"}  # a replay names its own --out


def _option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in _NOT_REPLAYED]


def _given_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The dests of the options set on the command line or in the ``--config`` file (the others are defaults)."""
    tokens, from_file = getattr(args, "argv", []), set(getattr(args, "config_keys", ()))
    return [a.dest for a in _option_actions(parser) if a.dest in from_file
            or any(t == o or t.startswith(o + "=") for t in tokens for o in a.option_strings)]


def _run_file_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``run.toml``: every option's resolved value, and which of them were given (what ``erase --mode auto``
    reads as configured)."""
    from llmeraser.options import to_toml

    values = {a.dest.replace("_", "-"): getattr(args, a.dest) for a in _option_actions(parser)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    given = [dest.replace("_", "-") for dest in _given_options(args, parser)]
    comment = (f"the resolved options of this run; `llmeraser {args.command} --config {RUN_FILE} "
               "--out NEW_DIR` replays it\n(given: the options set on the command line or in a config file; the "
               "others are the defaults)")
    return to_toml({"given": given}, {args.command: values}, comment)


def _run_with_run_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run the command; its output directory (rank 0; not for a dry run or a file output) gets ``run.toml``:
    inside the atomic write where the command writes the directory in one (train, erase, retrain,
    fit-curvature), else (bench, demo, make-data: written as they go) once it has finished."""
    from llmeraser.atomic import extra_files, write_text_atomic
    from llmeraser.distributed import is_main_process

    out = getattr(args, "out", None)
    if not out or getattr(args, "dry_run", False) or not is_main_process():
        args.run(args)
        return
    text = _run_file_text(args, parser)
    with extra_files(out, {RUN_FILE: text}):
        args.run(args)
    if Path(out).is_dir() and not (Path(out) / RUN_FILE).exists():
        write_text_atomic(Path(out) / RUN_FILE, text)


def _config_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Apply ``--config FILE`` (if given) as defaults of the chosen subcommand's parser; returns the keys
    that count as given (a ``run.toml``'s ``given`` list, else every key of the file)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config or not known.command:
        return set()
    path = Path(known.config)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"malformed TOML: {err}", path) from None
    given = table.pop("given", None) if isinstance(table.get("given"), list) else None  # a run.toml
    section = table.get(known.command, {})
    values = {k: v for k, v in table.items() if not isinstance(v, dict)} | (section if isinstance(section, dict) else {})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(known.command)
    if sub is None:
        return set()
    dests = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            raise InputError(f"unknown option '{key}' for '{known.command}'", path)
        defaults[dest] = value
    sub.set_defaults(**defaults)
    for action in sub._actions:  # options given in the file are no longer required on the command line
        if action.dest in defaults:
            action.required = False
    return set(defaults) if given is None else {str(key).replace("-", "_") for key in given}


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; llmeraser's own errors become a message and an exit code (2 usage, 3 input, 4
    numerical, 5 no space); any other exception is a bug and propagates with its traceback (exit 1)."""
    from llmeraser import lifecycle

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _FLAGS.clear()
    lifecycle.spell_options = _spell
    try:
        config_keys = _config_defaults(parser, argv)
        args = parser.parse_args(argv)
        sub = _subcommand(parser, args.command)
        _FLAGS.update(_flag_names(sub))
        args.argv, args.config_keys = argv, config_keys
        args.declared, args.given = _declared(sub), set(_given_options(args, sub))
        args.command_line = "llmeraser " + " ".join(shlex.quote(a) for a in argv)
        _check_declared(args, sub)
        init_from_environment()  # a no-op outside torchrun
        try:
            _run_with_run_file(args, sub)
        finally:
            shutdown()
    except ConfigError as err:  # an option value outside its declaration
        print(f"llmeraser: error: {_config_message(err, _FLAGS)}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as err:
        print(f"llmeraser: error: {_spell(str(err))}", file=sys.stderr)
        return EXIT_INPUT
    except NumericalError as err:
        print(f"llmeraser: numerical failure: {_spell(str(err))}", file=sys.stderr)
        return EXIT_NUMERICAL
    except OutputSpaceError as err:
        print(f"llmeraser: error: {err}", file=sys.stderr)
        return EXIT_NO_SPACE
    except OSError as err:  # a full disk in a write the library does not wrap
        if not is_out_of_space(err):
            raise
        print(f"llmeraser: error: {OutputSpaceError.from_os_error(err, err.filename or '(the output)')}", file=sys.stderr)
        return EXIT_NO_SPACE
    except KeyboardInterrupt:  # the writers remove their temporary files on the way out
        print("\nllmeraser: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        lifecycle.spell_options = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
