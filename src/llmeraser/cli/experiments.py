"""The paper's experiments as commands: ``bench`` (the protocol), ``demo`` and ``make-data``; the only place
the core reaches ``llmeraser_bench``, and only inside these commands (it needs the ``bench`` extra)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmeraser.cli.flags import Command, _add_options
from llmeraser.cli.shared import _refuse_existing
from llmeraser.errors import InputError

# the options of bench, in --help's order: BenchConfig's fields, and those of its eraser and recipe
_BENCH_FIELDS = ("data", "format", "ratios", "model", "methods", "n_train", "n_test")
_ERASER_FIELDS = ("solver", "max_iters", "curvature_examples", "damping", "kept_tolerance", "trust_region_memory",
                  "trust_region_refit_steps", "trust_region_refit_kept_level", "trust_region_follow_bounds")
_RECIPE_FIELDS = ("epochs",)
_MORE_BENCH_FIELDS = ("cache_method", "removal_unit", "trust_region_steps", "query_mode", "relearn_steps", "quantise_bits")
_HELPS = {"solver": "LLMEraser's solver", "max_iters": "LLMEraser's solver iterations",
          "curvature_examples": "examples for LLMEraser's curvature", "damping": "LLMEraser's damping λ",
          "epochs": "training epochs of the recipe",
          "trust_region_refit_kept_level": "end LLMEraser's refit once the kept examples' loss is back at the "
                                           "original adapter's (default: off)",
          "trust_region_follow_bounds": "turn LLMEraser's trust-region steps along the held-out guard and the "
                                        "replacements' floor instead of cutting them short there (default: off)"}


def _bench(args: argparse.Namespace) -> None:
    from llmeraser_bench import finish, render_text, run_bench, write_results
    from llmeraser_bench.protocol import task_config
    from llmeraser_bench.resources import elapsed_log

    def given(names: Sequence[str]) -> dict[str, Any]:  # an option not given keeps the task's value
        values = {name: getattr(args, "ratio" if name == "ratios" else name) for name in names}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}

    config = task_config(args.task, quick=args.quick)
    seeds: dict[str, Any] = {"seeds": tuple(range(args.seeds))} if args.seeds is not None else {}
    config = replace(config, eraser=replace(config.eraser, **given(_ERASER_FIELDS)),
                     recipe=replace(config.recipe, **given(_RECIPE_FIELDS)),
                     **given(_BENCH_FIELDS + _MORE_BENCH_FIELDS), **seeds)
    try:
        config.validate()
    except ValueError as error:
        raise InputError(str(error)) from None

    def checkpoint(partial: dict[str, Any]) -> None:  # what an interrupted run has measured stays on disk
        write_results(finish(partial), args.out)

    results = finish(run_bench(config, log=elapsed_log(), command=args.command_line, checkpoint=checkpoint))
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
    """BenchConfig's options (and its eraser's and recipe's), default None: the task's value (``task_config``)."""
    from llmeraser.eraser import EraseConfig
    from llmeraser.options import field_help
    from llmeraser.train import TrainConfig
    from llmeraser_bench.protocol import BENCH_TASKS, BenchConfig, task_config

    full, tasks = BenchConfig(), [task_config(task, quick) for task in BENCH_TASKS for quick in (False, True)]

    def default(path: tuple[str, ...], shown: Callable[[Any], str] = _shown) -> str:
        """The default as the full protocol has it, and whether a task or --quick sets another."""
        value = _value(full, path)
        if value is None:
            return "(default: the task's)"
        if all(_value(config, path) == value for config in tasks):
            return f"(default: {shown(value)})"
        return f"(default: the task's; {shown(value)} in the full protocol)"

    def add(cls: type, names: Sequence[str], path: tuple[str, ...] = (), **kwargs: Any) -> None:
        helps = {name: _HELPS.get(name) or field_help(cls, name) for name in names}
        helps = {name: text if "default" in text else f"{text} {default((*path, name))}" for name, text in helps.items()}
        _add_options(bench, cls, names, defaults=dict.fromkeys(names), helps=helps, flags={"ratios": "--ratio"}, **kwargs)

    _add_options(bench, BenchConfig, ["task"], required=["task"])
    add(BenchConfig, _BENCH_FIELDS[:4])
    bench.add_argument("--seeds", type=int, default=None,
                       help=f"number of training seeds (0, 1, …) {default(('seeds',), shown=lambda s: str(len(s)))}")
    add(BenchConfig, _BENCH_FIELDS[4:])
    add(TrainConfig, _RECIPE_FIELDS, ("recipe",))
    add(EraseConfig, _ERASER_FIELDS, ("eraser",))
    add(BenchConfig, _MORE_BENCH_FIELDS, nargs={"quantise_bits": "*"})
    bench.add_argument("--quick", action="store_true", help="the tiny random-init model and a few dozen examples (seconds)")
    bench.add_argument("--out", required=True, help="output directory for results.json, results.md and the PNG plots")


def _value(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _shown(value: Any) -> str:
    """A default as the command line spells it (a tuple: its values, space-separated)."""
    if isinstance(value, tuple):
        return " ".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _demo_flags(demo: argparse.ArgumentParser) -> None:
    from llmeraser_bench.demo import DemoConfig

    _add_options(demo, DemoConfig, ["model", "seed"])
    demo.add_argument("--out", default=None, help="directory for demo_results.json")


def _make_data_flags(make_data: argparse.ArgumentParser) -> None:
    from llmeraser_bench.recsys.corruption import TASKS
    from llmeraser_bench.recsys.ratings import FORMATS

    make_data.add_argument("--data", default="ml-100k",
                           help="ml-100k (the copy inside the recbole package) or a directory of rating files")
    make_data.add_argument("--format", default=None, choices=FORMATS,
                           help="rating file format (default: detected from the files)")
    make_data.add_argument("--task", default="mixed", choices=[*TASKS, "mixed"],
                           help="removal: remove examples; query: noisy prompts to restore; response: flipped labels to "
                           "correct; mixed: all three")
    make_data.add_argument("--fraction", type=float, default=0.05,
                           help="fraction of training examples affected (per kind for mixed)")
    make_data.add_argument("--n-train", type=int, default=200, help="training examples")
    make_data.add_argument("--n-test", type=int, default=100, help="validation and test examples (each)")
    make_data.add_argument("--history-length", type=int, default=5, help="rated items listed in each prompt")
    make_data.add_argument("--seed", type=int, default=0, help="seed of sampling and corruption")
    make_data.add_argument("--out", required=True, help="new directory for the JSONL files")


MAKE_DATA = Command("make-data", "TALLRec Yes/No examples from rating data, a corrupted training set and the requests "
                    "that repair it", _make_data_flags, _make_data)
BENCH = Command("bench", "the paper's protocol on rating data: corrupt, train, undo by LLMEraser and baselines, compare "
                "with retraining; prints a table, writes results.json, results.md and plots", _bench_flags, _bench,
                details="An option not given takes the task's value: the full protocol's (removal, query, response) "
                "unless the task (pii, next-item) or --quick sets another.")
DEMO = Command("demo", "train, erase and retrain on built-in MovieLens data; print one table", _demo_flags, _demo)
