"""``train`` and ``retrain``: a fresh LoRA adapter trained with a seeded recipe, saved with its training
record and the first entry of its lineage; ``retrain`` on the edited training set, paired with the original
run."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import Command, _add_dry_run, _add_dtype, _add_model, _add_options
from llmeraser.cli.shared import _estimate_train, _print_dry_run, _print_truncation, _refuse_existing
from llmeraser.errors import InputError, NumericalError
from llmeraser.models import DTYPES


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


def _train(args: argparse.Namespace) -> None:
    from llmeraser.data import read_examples

    _train_and_save(args.model, read_examples(args.data), _lora_settings(args), _recipe(args), args.out,
                    trust_remote_code=args.trust_remote_code, data_path=args.data, dry_run=args.dry_run,
                    dtype=args.dtype)


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


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    from llmeraser.adapter import LoraSettings
    from llmeraser.train import TrainConfig

    _add_options(parser, LoraSettings, ["r", "alpha"], prefix="lora_")
    _add_options(parser, LoraSettings, ["target_modules"])
    _add_options(parser, TrainConfig, ["epochs", "lr", "batch_size", "weight_decay", "seed", "max_length",
                                       "lr_schedule", "loss_scope", "optimizer"])



def _train_flags(train: argparse.ArgumentParser) -> None:
    _add_model(train, required=True)
    train.add_argument("--data", required=True,
                       help="training data: .jsonl, .json, .csv/.tsv or .parquet; prompt/response or conversation rows")
    train.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    _add_recipe(train)
    _add_dtype(train)
    _add_dry_run(train, "training")


def _retrain_flags(retrain: argparse.ArgumentParser) -> None:
    _add_model(retrain, required=False)
    retrain.add_argument("--data", required=True, help="the original training data (a data file)")
    retrain.add_argument("--requests", required=True, help="request file to apply to the data")
    retrain.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    retrain.add_argument("--like", default=None, help="adapter directory whose recorded model and recipe to reuse")
    _add_recipe(retrain)
    _add_dtype(retrain)


TRAIN = Command("train", "LoRA fine-tuning on a data file; records recipe, base model and data hash", _train_flags, _train)
RETRAIN = Command("retrain", "train from scratch on the edited training set with the same recipe (exact reference)",
                  _retrain_flags, _retrain)
