"""The public API: ``llmeraser``'s exports, the README's Python section and quickstart commands run as pasted (on the tiny model,
after the walkthrough's ``train`` step), the facade saving what the CLI saves, and one declaration of
every default shared by the library and the command line."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
from cli_helpers import FAST_TRAIN, cli
from conftest import one_thread, toy_examples

import llmeraser
from llmeraser.data import write_examples

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_block() -> str:
    """The first ```python block of the README's "## Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The walkthrough's files after its ``train`` step, on the tiny model."""
    root = tmp_path_factory.mktemp("walk")
    (root / "work" / "data").mkdir(parents=True)
    write_examples(root / "work" / "data" / "train.jsonl", toy_examples(12, seed=5))
    (root / "work" / "data" / "requests.jsonl").write_text(
        '{"op": "remove", "id": "ex1"}\n{"op": "correct_response", "id": "ex4", "response": " Maybe"}\n')
    done = cli("train", "--model", "tiny", "--data", root / "work" / "data" / "train.jsonl",
               "--out", root / "work" / "original", *FAST_TRAIN, "--epochs", "2")
    assert done.code == 0, done.err
    return root


def test_exports_resolve_lazily():
    assert set(llmeraser.__all__) >= {"Adapter", "EraseConfig", "read_examples", "Remove", "LlmeraserCallback"}
    for name in llmeraser.__all__:
        assert getattr(llmeraser, name) is not None
    with pytest.raises(AttributeError):
        llmeraser.not_a_name  # noqa: B018


def test_readme_python_section_runs_as_pasted(walkthrough, monkeypatch, capsys):
    monkeypatch.chdir(walkthrough)
    with one_thread():
        exec(compile(readme_python_block(), "README.md", "exec"), {})
    out = walkthrough / "work" / "erased-api"
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "erasure_report.json",
                                             "llmeraser_training.json", "lineage.jsonl"}
    report = json.loads((out / "erasure_report.json").read_text())
    assert report["requests"] == {"remove": 1, "modify_query": 0, "correct_response": 1}
    assert report["config"]["weight_decay"] == pytest.approx(0.1)  # the recipe's, from the record
    assert cli("history", out).code == 0  # lineage written by the library verifies
    record = json.loads((out / "llmeraser_training.json").read_text())
    assert record["n_examples"] == 11


def test_library_save_writes_what_the_cli_writes(walkthrough):
    """The CLI erase and Adapter.erase(...).save write the same files and the same weights."""
    from safetensors.torch import load_file

    root = walkthrough
    data, requests = root / "work" / "data" / "train.jsonl", root / "work" / "data" / "requests.jsonl"
    flags = ["--mode", "update", "--solver", "cg", "--max-iters", "8", "--damping", "0.01"]  # cg: seconds; direct forms H
    done = cli("erase", "--adapter", root / "work" / "original", "--data", data, "--requests", requests,
               "--out", root / "cli-out", *flags)
    assert done.code == 0, done.err
    adapter = llmeraser.Adapter.load(root / "work" / "original")
    train, reqs = llmeraser.read_examples(data), llmeraser.read_requests(requests)
    with one_thread():
        erased = adapter.erase(train, reqs, adapter.erase_config(solver="cg", max_iters=8, damping=0.01), progress=False)
    erased.save(root / "api-out")
    cli_files = sorted(p.name for p in (root / "cli-out").iterdir() if p.name != "run.toml")  # the command line's options
    assert cli_files == sorted(p.name for p in (root / "api-out").iterdir())
    a, b = load_file(root / "cli-out" / "adapter_model.safetensors"), load_file(root / "api-out" / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    for name in ("llmeraser_training.json",):
        assert json.loads((root / "cli-out" / name).read_text()) == json.loads((root / "api-out" / name).read_text())
    with pytest.raises(llmeraser.InputError, match="already exists"):
        erased.save(root / "api-out")


def _subparser(name: str) -> argparse.ArgumentParser:
    from llmeraser.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


# flags whose default is deliberately "from the adapter's training record" (None), not a library value
FROM_RECORD = {"weight_decay", "max_length", "loss_scope", "trust_region"}


@pytest.mark.parametrize(("command", "config", "renamed"), [
    ("erase", "llmeraser.eraser.EraseConfig", {}),
    ("fit-curvature", "llmeraser.curvature.CurvatureFitConfig", {"datainf_damping": "damping"}),
    ("train", "llmeraser.train.TrainConfig", {}),
    ("train", "llmeraser.adapter.LoraSettings", {"r": "lora_r", "alpha": "lora_alpha", "target_modules": "target_modules"}),
])
def test_cli_defaults_are_the_library_defaults(command, config, renamed):
    module, name = config.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    sub = _subparser(command)
    dests = {a.dest for a in sub._actions}
    compared = 0
    for field in fields(cls):
        dest = renamed.get(field.name, field.name)
        if dest not in dests or dest in FROM_RECORD and command != "train":
            continue
        default = sub.get_default(dest)
        expected = field.default
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, (command, field.name)
        compared += 1
    assert compared >= 4


def test_fit_functions_share_the_calibration_defaults():
    from llmeraser.curvature import CurvatureFitConfig, fit_cached_curvature, fit_curvature_cache

    settings = CurvatureFitConfig()
    for function in (fit_cached_curvature, fit_curvature_cache):
        parameters = inspect.signature(function).parameters
        assert parameters["calibration_examples"].default == settings.calibration_examples == 16
        assert parameters["calibration_directions"].default == settings.calibration_directions == 8
    assert inspect.signature(fit_cached_curvature).parameters["damping"].default == settings.calibration_damping
    assert _subparser("erase").get_default("damping") == llmeraser.EraseConfig().damping == 1e-2


def readme_quickstart_commands() -> list[list[str]]:
    """The ``llmeraser`` commands of the README's "## Quickstart on your own files" bash block, each as its
    argument list (continuation lines joined, comments dropped)."""
    import shlex

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart on your own files\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("llmeraser ")]


def test_readme_quickstart_runs_as_pasted(tmp_path, monkeypatch):
    """Every command of the README's quickstart, as written, on your-own-files data (the tiny model in place
    of smollm2-135m): each exits 0 and writes what it says."""
    commands = readme_quickstart_commands()
    assert [c[0] for c in commands] == ["train", "fit-curvature", "erase", "erase", "retrain", "evaluate", "history"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work" / "data").mkdir(parents=True)
    write_examples(tmp_path / "work" / "data" / "train.jsonl", toy_examples(12, seed=5))
    write_examples(tmp_path / "work" / "data" / "heldout.jsonl", toy_examples(4, seed=9))
    (tmp_path / "work" / "data" / "requests.jsonl").write_text(
        '{"op": "remove", "id": "ex1"}\n{"op": "correct_response", "id": "ex4", "response": " Maybe"}\n')
    for argv in commands:
        argv = ["tiny" if a == "smollm2-135m" else a for a in argv]
        done = cli(*argv)
        assert done.code == 0, (argv, done.err)
    for name in ("original", "curv", "erased", "erased-update", "retrained"):
        assert (tmp_path / "work" / name).is_dir(), name
    assert json.loads((tmp_path / "work" / "eval.json").read_text())
    assert json.loads((tmp_path / "work" / "erased-update" / "erasure_report.json").read_text())["trust_region"]
