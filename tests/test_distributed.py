"""Data-parallel erase, train and fit-curvature on torch.distributed (gloo, 2 CPU processes under torchrun)
equal one process."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from conftest import one_thread, tiny_lora_model, toy_examples
from safetensors.torch import load_file

from llmeraser.adapter import save_adapter
from llmeraser.curvature import load_cache
from llmeraser.data import write_examples
from llmeraser.train import TrainConfig, train_adapter

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def adapter_tensors(directory: Path) -> torch.Tensor:
    weights = load_file(str(directory / "adapter_model.safetensors"))
    return torch.cat([weights[k].double().reshape(-1) for k in sorted(weights)])


def run_both(program: list[str], args_one: list[str], args_two: list[str], env: dict[str, str] = ENV) -> None:
    """``PROGRAM ARGS_ONE`` in one process, this one (``-m llmeraser …`` through ``cli``, a runner script through
    its ``main``; a fresh interpreter would add its start-up, ~8 s), then ``torchrun --nproc-per-node 2 PROGRAM
    ARGS_TWO``. ``--standalone``: the rendezvous on a free port (tests running at once on other pytest-xdist
    workers start their own)."""
    if program[:2] == ["-m", "llmeraser"]:
        single = cli(*program[2:], *args_one)
        assert single.code == 0, single.err
    else:
        with one_thread():
            runpy.run_path(program[0])["main"](*args_one)
    parallel = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *program, *args_two],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]


def relative_max_difference(one: torch.Tensor, two: torch.Tensor) -> float:
    """max |one − two| / ‖one‖."""
    return float((one - two).abs().max()) / float(one.norm())


@pytest.mark.parametrize("solver", ["cg", "sgd"])
def test_two_process_erase_equals_single_process(tmp_path, solver):
    model, tokenizer = tiny_lora_model(target_modules=("q_proj", "v_proj", "lm_head"), r=2, dtype=torch.float32)
    examples = toy_examples(13, seed=7)  # odd sizes: the shards differ in length
    train_adapter(model, tokenizer, examples, TrainConfig(epochs=5, lr=2e-2, batch_size=4, weight_decay=0.1))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    data = tmp_path / "train.jsonl"
    write_examples(data, examples)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"op": "remove", "id": "ex1"}\n{"op": "remove", "id": "ex4"}\n'
                        '{"op": "correct_response", "id": "ex6", "response": " Maybe"}\n')
    common = ["erase", "--model", "tiny", "--adapter", str(adapter), "--data", str(data), "--requests", str(requests),
              "--solver", solver, "--damping", "0.05", "--weight-decay", "0.1", "--batch-size", "4", "--max-iters", "40",
              "--max-length", "256", "--loss-scope", "response"]  # the recipe's values: no training record here
    run_both(["-m", "llmeraser", *common], ["--out", str(tmp_path / "one")], ["--out", str(tmp_path / "two")])
    theta = adapter_tensors(adapter)
    update_one = adapter_tensors(tmp_path / "one") - theta
    update_two = adapter_tensors(tmp_path / "two") - theta
    assert float(update_one.norm()) > 0
    assert float((update_one - update_two).abs().max()) <= 1e-5 * float(update_one.norm())
    report = json.loads((tmp_path / "two" / "erasure_report.json").read_text())
    assert report["world_size"] == 2 and report["n_curvature_examples"] == 11


def test_two_process_train_equals_single_process(tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, toy_examples(13, seed=7))  # batches of 4: the last one (1 example) leaves rank 1 empty
    args = ["train", "--model", "tiny", "--data", str(data), "--lora-r", "2", "--epochs", "3", "--lr", "2e-2",
            "--batch-size", "4", "--weight-decay", "0.1", "--max-length", "128"]
    run_both(["-m", "llmeraser", *args], ["--out", str(tmp_path / "one")], ["--out", str(tmp_path / "two")])
    one, two = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert relative_max_difference(one, two) <= 1e-5
    records = [json.loads((tmp_path / d / "llmeraser_training.json").read_text()) for d in ("one", "two")]
    assert records[0] == records[1]


def test_two_process_lbfgs_equals_single_process(tmp_path):
    runner = Path(__file__).with_name("distributed_train_runner.py")  # float64, rank 1: see its docstring
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(runner.parent), os.environ.get("PYTHONPATH", "")])}
    run_both([str(runner)], [str(tmp_path / "one.pt")], [str(tmp_path / "two.pt")], env)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert relative_max_difference(one, two) <= 1e-5


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_two_process_fit_curvature_equals_single_process(tmp_path, method):
    """Compared as operators: K applied to fixed random matrices, per layer (eigenvectors are defined up
    to sign, and inside null spaces up to any rotation: EK-FAC pools its Λ there so that K is unique)."""
    model, tokenizer = tiny_lora_model(r=2, dtype=torch.float32)
    examples = toy_examples(13, seed=7)
    train_adapter(model, tokenizer, examples, TrainConfig(epochs=2, lr=2e-2, batch_size=4))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    data = tmp_path / "train.jsonl"
    write_examples(data, examples)
    run_both(["-m", "llmeraser", "fit-curvature", "--model", "tiny", "--adapter", str(adapter), "--data", str(data),
              "--batch-size", "3", "--method", method, "--weight-decay", "0", "--max-length", "256", "--loss-scope", "response"],
             ["--out", str(tmp_path / "one")], ["--out", str(tmp_path / "two")])

    def products(directory: Path) -> torch.Tensor:
        factors, metadata = load_cache(directory, {})
        assert metadata["kind"] == method and all(f.method == method for f in factors.values())
        generator = torch.Generator().manual_seed(0)
        pieces = []
        for name in sorted(factors):
            shape = (len(factors[name].g_values), len(factors[name].a_values))
            for _ in range(3):
                pieces.append(factors[name].product(torch.randn(shape, generator=generator, dtype=torch.float64)).reshape(-1))
        return torch.cat(pieces)

    one, two = products(tmp_path / "one"), products(tmp_path / "two")
    assert float(one.norm()) > 0
    assert relative_max_difference(one, two) <= 1e-5
    alphas = [json.loads((tmp_path / d / "curvature.json").read_text())["calibration"]["step_length"] for d in ("one", "two")]
    assert alphas[0] == pytest.approx(alphas[1], rel=1e-5)  # the step length, calibrated with sharded exact products
    meta = json.loads((tmp_path / "two" / "curvature.json").read_text())
    assert meta["n_examples"] == 13
