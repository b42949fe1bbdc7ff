"""One declaration per option: config dataclasses validate themselves (``ConfigError`` names the field),
the CLI's flags are generated from them (choices, defaults, help) and show the field as its flag; only
llmeraser's own errors get exit codes (anything else is a bug with its traceback); every output directory
holds a ``run.toml`` that replays the run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import MISSING
from pathlib import Path

import pytest
import tomllib
from cli_helpers import FAST_TRAIN, cli
from conftest import toy_examples

from llmeraser.adapter import LoraSettings
from llmeraser.cli import build_parser, main
from llmeraser.cli.flags import _subcommand
from llmeraser.data import write_examples
from llmeraser.eraser import EraseConfig
from llmeraser.errors import ConfigError, LLMEraserError
from llmeraser.options import choices_of, declared, field_type
from llmeraser.train import TrainConfig

REQUESTS = [{"op": "remove", "id": "ex3"}, {"op": "correct_response", "id": "ex6", "response": " Maybe"}]


@pytest.mark.parametrize("config,values,field,message", [
    (EraseConfig, {"damping": -1.0}, "damping", "damping must be >= 0, got -1.0"),
    (EraseConfig, {"damping": float("nan")}, "damping", "damping must be >= 0, got nan"),
    (EraseConfig, {"solver": "newton"}, "solver", "solver must be one of: direct, cg, lissa, sgd, got 'newton'"),
    (EraseConfig, {"kl_budget": 0.0}, "kl_budget", "kl_budget must be > 0, got 0.0"),
    (EraseConfig, {"curvature_use": "both"}, "curvature_use", "must be one of: precondition, direct"),
    (TrainConfig, {"lr": 0.0}, "lr", "lr must be > 0, got 0.0"),
    (TrainConfig, {"loss_scope": "tokens"}, "loss_scope", "loss_scope must be one of: response, assistant, all"),
    (LoraSettings, {"r": 0}, "r", "r must be >= 1, got 0"),
])
def test_a_config_refuses_values_outside_its_declaration_naming_the_field(config, values, field, message):
    with pytest.raises(ConfigError) as caught:
        config(**values)
    assert caught.value.field == field and message in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, LLMEraserError)  # old callers keep working
    assert "--" not in str(caught.value)  # a field, not a flag
    config()  # the defaults are valid


def test_a_recorded_recipe_may_hold_values_llmeraser_does_not_run():
    """An adapter trained by an HF Trainer records its optimizer and schedule (``LlmeraserCallback``)."""
    recipe = TrainConfig(optimizer="adamw", lr_schedule="cosine")  # type: ignore[arg-type]
    assert recipe.optimizer == "adamw" and choices_of(TrainConfig, "optimizer") == ("adam", "lbfgs")


def test_generated_flags_carry_the_declared_choices_defaults_and_help():
    parser = build_parser()
    cases = {"erase": [EraseConfig], "train": [TrainConfig, LoraSettings]}
    for command, classes in cases.items():
        sub = _subcommand(parser, command)
        actions = {a.dest: a for a in sub._actions}
        for cls in classes:
            for f in declared(cls):
                dest = {"trust_region_steps": "steps", "r": "lora_r", "alpha": "lora_alpha"}.get(f.name, f.name)
                action = actions.get(dest)
                if action is None:
                    continue  # declared, no flag of this command (e.g. the damping factor of auto_damping)
                default = f.default if f.default is not MISSING else f.default_factory()
                recorded = command == "erase" and f.name in ("weight_decay", "max_length", "loss_scope",
                                                             "trust_region_steps", "trust_region")  # None: decided at run time
                expected = None if recorded else (list(default) if isinstance(default, tuple) else default)
                assert action.default == expected, (command, f.name)
                if field_type(cls, f.name)[1] is not None:
                    assert tuple(action.choices) == choices_of(cls, f.name), (command, f.name)
    help_text = _subcommand(parser, "erase").format_help()
    assert "inverse-HVP solver (default: cg)" in " ".join(help_text.split())
    assert "(default 8)" in help_text and f"(default {EraseConfig.trust_region_steps})" in help_text


def test_the_fit_bench_and_demo_flags_come_from_their_configs():
    from llmeraser.curvature import curvature_methods
    from llmeraser_bench.demo import DemoConfig
    from llmeraser_bench.protocol import BenchConfig

    parser = build_parser()
    fit = {a.dest: a for a in _subcommand(parser, "fit-curvature")._actions}
    assert tuple(fit["method"].choices) == curvature_methods()  # the registry's, at parser build
    assert fit["calibration_directions"].type is int and fit["damping"].default is None  # datainf_damping
    bench = {a.dest: a for a in _subcommand(parser, "bench")._actions}
    flagged = [f for f in declared(BenchConfig) if f.name != "relearn_examples"]  # no flag: the attack's size
    for f in flagged:
        action = bench["ratio" if f.name == "ratios" else f.name]
        assert action.default is None, f.name  # None: the task's value (task_config)
        if field_type(BenchConfig, f.name)[1] is not None:
            assert tuple(action.choices) == choices_of(BenchConfig, f.name), f.name
    assert bench["task"].required and bench["quantise_bits"].nargs == "*"
    demo = {a.dest: a for a in _subcommand(parser, "demo")._actions}
    assert (demo["model"].default, demo["seed"].default) == (DemoConfig.model, DemoConfig.seed)


def test_a_core_command_never_builds_the_experiments_flags():
    """``main`` adds the flags of the command it runs alone: the core's never import ``llmeraser_bench``."""
    script = ("import sys\nfrom llmeraser.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
              "    pass\nassert not [m for m in sys.modules if m.startswith('llmeraser_bench')]\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0 and "--lora-r" in done.stdout, done.stderr


@pytest.mark.parametrize("command", ["erase", "train", "fit-curvature", "bench", "evaluate", "retrain", "demo", "make-data"])
def test_help_states_each_default_once(command):
    text = _subcommand(build_parser(), command).format_help()
    for chunk in text.split("\n  -")[1:]:
        chunk = " ".join(chunk.split())
        assert "(default: None)" not in chunk and "(default: False)" not in chunk, chunk
        assert not re.search(r"\(default[^)]*\) \(default: ", chunk), chunk  # "(default 5) (default: None)"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    write_examples(root / "train.jsonl", toy_examples(10, seed=11))
    (root / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    trained = cli("train", "--model", "tiny", "--data", root / "train.jsonl", "--out", root / "adapter", *FAST_TRAIN)
    assert trained.code == 0, trained.err
    return root


def test_a_config_error_names_the_flag_and_exits_2(work, tmp_path):
    done = cli("train", "--model", "tiny", "--data", work / "train.jsonl", "--out", tmp_path / "x", "--lr", "0")
    assert done.code == 2 and "llmeraser: error: --lr must be > 0, got 0.0" in done.err, done.err
    done = cli("erase", "--adapter", work / "adapter", "--data", work / "train.jsonl", "--requests", work / "req.jsonl",
               "--out", tmp_path / "y", "--steps", "0")
    assert done.code == 2 and "--steps must be >= 1, got 0" in done.err  # trust_region_steps, as its flag
    assert "Traceback" not in done.err and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_config_error_inside_the_library_is_shown_with_the_flag(work, tmp_path):
    # a curvature cache preconditions cg and sgd only: the library names the field, the CLI the flags
    fitted = cli("fit-curvature", "--adapter", work / "adapter", "--data", work / "train.jsonl", "--out",
                 tmp_path / "curv", "--method", "kfac", "--calibration-examples", "0")
    assert fitted.code == 0, fitted.err
    done = cli("erase", "--adapter", work / "adapter", "--data", work / "train.jsonl", "--requests", work / "req.jsonl",
               "--out", tmp_path / "y", "--curvature-cache", tmp_path / "curv", "--solver", "lissa")
    assert done.code == 2, done.err
    assert "llmeraser: error: --solver must be cg or sgd with --curvature-use precondition" in done.err, done.err


def _explode(*args, **kwargs):
    raise ValueError("boom: a bug, not a usage error")


def test_a_foreign_value_error_is_a_bug_not_a_usage_error(work, tmp_path, monkeypatch):
    import llmeraser.requests

    monkeypatch.setattr(llmeraser.requests, "read_requests", _explode)
    argv = ["apply-requests", "--data", str(work / "train.jsonl"), "--requests", str(work / "req.jsonl"),
            "--out", str(tmp_path / "edited.jsonl")]
    with pytest.raises(ValueError, match="boom"):  # not caught: the interpreter prints the traceback, exit 1
        main(argv)


def test_a_foreign_value_error_exits_1_with_its_traceback(work, tmp_path):
    script = ("import sys, llmeraser.requests as r\n"
              "def explode(*a, **k):\n    raise ValueError('boom: a bug, not a usage error')\n"
              "r.read_requests = explode\n"
              "from llmeraser.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, "apply-requests", "--data", str(work / "train.jsonl"),
                           "--requests", str(work / "req.jsonl"), "--out", str(tmp_path / "e.jsonl")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" in done.stderr and "ValueError: boom" in done.stderr and "llmeraser: error" not in done.stderr


def test_run_toml_replays_a_training_run_to_the_same_bytes(work, tmp_path):
    first = work / "adapter"
    recorded = tomllib.loads((first / "run.toml").read_text())
    assert recorded["train"]["lora-r"] == 2 and recorded["train"]["target-modules"] == ["q_proj", "v_proj"]
    assert recorded["train"]["epochs"] == 3 and recorded["train"]["optimizer"] == "adam"  # given, and a default
    assert "out" not in recorded["train"] and "lr" in recorded["given"] and "optimizer" not in recorded["given"]
    again = cli("train", "--config", first / "run.toml", "--out", tmp_path / "again")
    assert again.code == 0, again.err
    assert (tmp_path / "again" / "run.toml").read_bytes() == (first / "run.toml").read_bytes()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes(), name


def test_run_toml_replays_a_configured_erase(work, tmp_path):
    done = cli("erase", "--adapter", work / "adapter", "--data", work / "train.jsonl", "--requests", work / "req.jsonl",
               "--out", tmp_path / "first", "--damping", "0.1", "--max-iters", "5", "--solver", "cg")
    assert done.code == 0, done.err
    recorded = tomllib.loads((tmp_path / "first" / "run.toml").read_text())
    assert recorded["erase"]["damping"] == 0.1 and recorded["erase"]["mode"] == "auto"
    assert set(recorded["given"]) == {"adapter", "data", "requests", "damping", "max-iters", "solver"}
    again = cli("erase", "--config", tmp_path / "first" / "run.toml", "--out", tmp_path / "again")
    assert again.code == 0, again.err
    assert (tmp_path / "again" / "run.toml").read_bytes() == (tmp_path / "first" / "run.toml").read_bytes()
    reports = [json.loads((tmp_path / d / "erasure_report.json").read_text()) for d in ("first", "again")]
    assert reports[0]["method"] == reports[1]["method"] == "update"  # the given solver flags still configure it
    assert reports[0]["config"] == reports[1]["config"]
    weights = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("first", "again")]
    assert weights[0] == weights[1]
