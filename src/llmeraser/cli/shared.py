"""What several commands do when they run: refuse an existing output, say how many examples are cut,
print a dry run's estimate, load and check an existing adapter (and the flags that say how)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import _add_dtype, _add_model, _add_record_recipe, _spell
from llmeraser.errors import InputError


def _refuse_existing(out: str) -> None:
    if Path(out).exists():
        raise InputError("output directory already exists (choose a new one; nothing is overwritten)", out)


def _print_truncation(truncated: int, n_examples: int, max_length: int) -> None:
    """Say once on the console how many examples are cut to ``max_length`` (and from which side)."""
    from llmeraser.distributed import is_main_process
    from llmeraser.validate import truncation_note

    note = truncation_note(truncated, n_examples, max_length)
    if note and is_main_process():
        print(_spell(note))


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


def _add_checked_adapter(parser: argparse.ArgumentParser) -> None:
    """The flags ``_load_checked_adapter`` reads: the adapter and its training data, the base model, the
    recipe values (default: the training record's), mismatches allowed, the dtype."""
    _add_model(parser, required=False)
    parser.add_argument("--adapter", required=True, help="input PEFT adapter directory (never modified)")
    parser.add_argument("--data", required=True,
                        help="the training data the adapter was trained on (.jsonl, .json, .csv/.tsv, .parquet)")
    _add_record_recipe(parser, ["weight_decay", "max_length", "loss_scope"])
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="proceed although base model or data differ from the adapter's record")
    _add_dtype(parser)
