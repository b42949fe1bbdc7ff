"""The commands that read adapters and data and write no adapter: ``evaluate`` (losses, AUC, forgetting of
edited examples, distances between adapters), ``history`` (an adapter's lineage, verified) and
``apply-requests`` (the training set as request files edit it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import Command, _add_dtype, _add_model, _add_record_recipe
from llmeraser.cli.shared import _print_truncation
from llmeraser.errors import InputError
from llmeraser.models import DTYPES


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
        rows.append(("edited (old versions)",
                     evaluate_examples(model, tokenizer, edited_old, max_length, args.batch_size, scope)))
        if edited_new:
            rows.append(("edited (new versions)",
                         evaluate_examples(model, tokenizer, edited_new, max_length, args.batch_size, scope)))
    comparisons = []
    for other in args.compare or []:
        theta_other = adapter_vector(model, other)
        entry: dict[str, Any] = {"adapter": other}
        for key, items in (("data", examples), ("edited_old", edited_old), ("edited_new", edited_new)):
            if items or key == "data":
                entry[key] = function_space_distance(model, tokenizer, items, theta_other, theta, max_length,
                                                     args.batch_size, scope)
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


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


def _evaluate_flags(evaluate: argparse.ArgumentParser) -> None:
    _add_model(evaluate, required=False)
    evaluate.add_argument("--adapter", required=True, help="adapter directory to evaluate")
    evaluate.add_argument("--data", required=True, help="evaluation data (.jsonl, .json, .csv/.tsv, .parquet)")
    evaluate.add_argument("--requests", default=None, help="request file: also report each edited example's old and new loss")
    evaluate.add_argument("--train-data", default=None, help="training data the requests refer to (default: --data)")
    evaluate.add_argument("--compare", nargs="+", default=None, help="other adapter directories to measure distances to")
    evaluate.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    _add_record_recipe(evaluate, ["max_length", "loss_scope"])
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_dtype(evaluate)


def _history_flags(history: argparse.ArgumentParser) -> None:
    history.add_argument("adapter", help="adapter directory")
    history.add_argument("--json", action="store_true", help="print the entries and problems as JSON")


def _apply_requests_flags(apply_requests: argparse.ArgumentParser) -> None:
    apply_requests.add_argument("--data", required=True, help="training data (any supported format; written back as JSONL)")
    apply_requests.add_argument("--requests", required=True, nargs="+", help="request file(s), applied in this order")
    apply_requests.add_argument("--out", required=True, help="new JSONL file (must not exist)")


EVALUATE = Command("evaluate", "losses, perplexity, Yes/No accuracy and AUC, forgetting of edited examples, distances "
                   "between adapters", _evaluate_flags, _evaluate)
HISTORY = Command("history", "print an adapter's lineage (train and erase steps) and verify its hash chain",
                  _history_flags, _history)
APPLY_REQUESTS = Command("apply-requests", "write the training set as edited by request files (applied in order): "
                         "the --data for erasing again on top of an erased adapter", _apply_requests_flags, _apply_requests)
