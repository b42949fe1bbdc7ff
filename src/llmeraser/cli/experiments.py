"""The paper's experiments as commands: ``bench`` (the protocol), ``demo`` and ``make-data``; the only place
the core reaches ``llmeraser_bench``, and only inside these commands (it needs the ``bench`` extra)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import Command
from llmeraser.cli.shared import _refuse_existing
from llmeraser.errors import InputError


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



def _bench_flags(bench: argparse.ArgumentParser) -> None:
    from llmeraser.curvature import curvature_methods
    from llmeraser.eraser import EraseConfig
    from llmeraser.options import choices_of
    from llmeraser.trust_region import TrustRegionSettings

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


def _demo_flags(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a hub id or a local directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of data sampling, adapter init and training order")
    demo.add_argument("--out", default=None, help="directory for demo_results.json")


def _make_data_flags(make_data: argparse.ArgumentParser) -> None:
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


MAKE_DATA = Command("make-data", "TALLRec Yes/No examples from rating data, a corrupted training set and the requests "
                    "that repair it", _make_data_flags, _make_data)
BENCH = Command("bench", "the paper's protocol on rating data: corrupt, train, undo by LLMEraser and baselines, compare "
                "with retraining; prints a table, writes results.json, results.md and plots", _bench_flags, _bench)
DEMO = Command("demo", "train, erase and retrain on built-in MovieLens data; print one table", _demo_flags, _demo)
