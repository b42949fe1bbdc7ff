"""The ``llmeraser`` command: a thin shell over the library.

Exit codes: 0 success, 2 usage error (argparse), 3 bad input (files, ids, adapters), 4 numerical failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from llmeraser.errors import InputError, NumericalError

EXIT_INPUT, EXIT_NUMERICAL = 3, 4


def _demo(args: argparse.Namespace) -> None:
    from llmeraser.demo import DemoConfig, run_demo, tiny_demo_config

    config = tiny_demo_config() if args.model == "tiny" else replace(DemoConfig(), model=args.model)
    run_demo(replace(config, seed=args.seed), out_dir=args.out)


def _train(args: argparse.Namespace) -> None:
    from llmeraser.data import read_examples
    from llmeraser.model import LoraSettings, attach_lora, load_base_model, save_adapter
    from llmeraser.train import TrainConfig, train_adapter

    examples = read_examples(args.data)
    base, tokenizer = load_base_model(args.model, seed=args.seed)
    model = attach_lora(base, LoraSettings(args.lora_r, args.lora_alpha, 0.0, tuple(args.target_modules), args.seed))
    recipe = TrainConfig(args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed, args.max_length)
    result = train_adapter(model, tokenizer, examples, recipe, progress=True)
    save_adapter(model, args.out, extra_files={"llmeraser_recipe.json": {"recipe": recipe.to_json(), "model": args.model}})
    print(f"trained {len(examples)} examples in {result.wall_time_s:.1f} s; final loss {result.losses[-1]:.4f}")
    print(f"adapter written to {args.out}")


def _erase(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from llmeraser.data import read_examples
    from llmeraser.eraser import EraseConfig, erase, save_erased_adapter
    from llmeraser.model import load_adapter, load_base_model
    from llmeraser.requests import read_requests

    requests = read_requests(args.requests)
    examples = read_examples(args.data)
    if Path(args.out).exists():
        raise InputError("output directory already exists (choose a new one)", args.out)
    recipe_file = Path(args.adapter) / "llmeraser_recipe.json"
    recipe = json.loads(recipe_file.read_text())["recipe"] if recipe_file.is_file() else {}
    weight_decay = args.weight_decay if args.weight_decay is not None else recipe.get("weight_decay", 0.0)
    base, tokenizer = load_base_model(args.model)
    model = load_adapter(base, args.adapter)
    config = EraseConfig(
        solver=args.solver, curvature=args.curvature, damping=args.damping, scaling=args.scaling,
        weight_decay=weight_decay, max_iters=args.max_iters, tol=args.tol, batch_size=args.batch_size,
        curvature_examples=args.curvature_examples, max_length=recipe.get("max_length", args.max_length),
    )
    result = erase(model, tokenizer, examples, requests, config)
    save_erased_adapter(model, result, args.out)
    print(f"{result.report['requests']}: solver {result.solver.status}, relative residual "
          f"{result.solver.final_residual:.2e}, ‖v‖ = {result.report['update_norm']:.3e}")
    print(f"erased adapter written to {args.out} (report: {Path(args.out) / 'erasure_report.json'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmeraser",
        description="Unlearn training examples from a LoRA adapter by influence functions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    demo = commands.add_parser("demo", help="train, erase and retrain on built-in MovieLens data; print one table",
                               formatter_class=fmt)
    demo.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a hub id or a local directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of data sampling, adapter init and training order")
    demo.add_argument("--out", default=None, help="directory for demo_results.json (optional)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="LoRA fine-tuning on a JSONL data file", formatter_class=fmt)
    train.add_argument("--model", required=True, help="smollm2-135m, tiny, a hub id or a local directory")
    train.add_argument("--data", required=True, help="training data, JSONL {id, prompt, response}")
    train.add_argument("--out", required=True, help="new adapter directory")
    train.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    train.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    train.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="modules to adapt")
    train.add_argument("--epochs", type=int, default=3, help="passes over the data")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step")
    train.add_argument("--weight-decay", type=float, default=0.0, help="L2 coefficient λ_wd of (λ_wd/2)‖θ‖²")
    train.add_argument("--seed", type=int, default=0, help="seed of adapter init and example order")
    train.add_argument("--max-length", type=int, default=256, help="max tokens per example (prompt cut from the left)")
    train.set_defaults(run=_train)

    erase_cmd = commands.add_parser("erase", help="apply a request file to an adapter; write a new adapter",
                                    formatter_class=fmt)
    erase_cmd.add_argument("--model", required=True, help="base model of the adapter")
    erase_cmd.add_argument("--adapter", required=True, help="input PEFT adapter directory (never modified)")
    erase_cmd.add_argument("--data", required=True, help="the training data the adapter was trained on (JSONL)")
    erase_cmd.add_argument("--requests", required=True, help="request file (JSONL: remove / modify_query / correct_response)")
    erase_cmd.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    erase_cmd.add_argument("--solver", default="cg", choices=["direct", "cg", "lissa", "sgd"], help="inverse-HVP solver")
    erase_cmd.add_argument("--curvature", default="gauss-newton", choices=["gauss-newton", "hessian"], help="curvature matrix")
    erase_cmd.add_argument("--damping", type=float, default=1e-2, help="λ added to the curvature")
    erase_cmd.add_argument("--scaling", default="retrain", choices=["retrain", "paper"],
                           help="retrain: Newton step to the retraining objective (1/(n-k)); paper: 1/n")
    erase_cmd.add_argument("--weight-decay", type=float, default=None,
                           help="the recipe's λ_wd (default: read from the adapter's llmeraser_recipe.json, else 0)")
    erase_cmd.add_argument("--max-iters", type=int, default=50, help="solver iterations")
    erase_cmd.add_argument("--tol", type=float, default=1e-4, help="relative residual to stop at")
    erase_cmd.add_argument("--batch-size", type=int, default=8, help="examples per forward pass / stochastic mini-batch")
    erase_cmd.add_argument("--curvature-examples", type=int, default=None,
                           help="random subset of training examples for the curvature (default: all)")
    erase_cmd.add_argument("--max-length", type=int, default=256, help="max tokens (default: the recipe's)")
    erase_cmd.set_defaults(run=_erase)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as err:
        print(f"llmeraser: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except NumericalError as err:
        print(f"llmeraser: numerical failure: {err}", file=sys.stderr)
        return EXIT_NUMERICAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
