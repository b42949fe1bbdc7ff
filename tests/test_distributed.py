"""Data-parallel erase on torch.distributed (gloo, 2 CPU processes under torchrun) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_lora_model, toy_examples
from safetensors.torch import load_file

from llmeraser.data import write_examples
from llmeraser.model import save_adapter
from llmeraser.train import TrainConfig, train_adapter

BIN = Path(sys.executable).parent


def adapter_tensors(directory: Path) -> torch.Tensor:
    weights = load_file(str(directory / "adapter_model.safetensors"))
    return torch.cat([weights[k].double().reshape(-1) for k in sorted(weights)])


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
              "--solver", solver, "--damping", "0.05", "--weight-decay", "0.1", "--batch-size", "4", "--max-iters", "40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(BIN / "llmeraser"), *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr
    parallel = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
         "-m", "llmeraser", *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    theta = adapter_tensors(adapter)
    update_one = adapter_tensors(tmp_path / "one") - theta
    update_two = adapter_tensors(tmp_path / "two") - theta
    assert float(update_one.norm()) > 0
    assert float((update_one - update_two).abs().max()) <= 1e-5 * float(update_one.norm())
    report = json.loads((tmp_path / "two" / "erasure_report.json").read_text())
    assert report["world_size"] == 2 and report["n_curvature_examples"] == 11
