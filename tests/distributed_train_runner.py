"""Train the tiny float64 model with full-batch L-BFGS and save θ (used by ``test_distributed.py``; not a
test itself). Run as ``python distributed_train_runner.py OUT.pt`` or under ``torchrun``: rank 0 saves.

float64 and LoRA rank 1: a minimiser of the L2-regularised objective is isolated (rank ≥ 2 leaves a
continuous rotation symmetry, along which L-BFGS drifts with the rounding), so runs that differ only in
summation order end at the same θ within float tolerance. Weight decay 1: at 0.1 the minimum was shallow
enough that on this project's current CI processors the two runs ended 5.3e-5 apart (relative), at the
base commit as well; the stronger L2 term makes the minimiser well conditioned.
"""

from __future__ import annotations

import sys

import torch
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.distributed import init_from_environment, is_main_process, shutdown
from llmeraser.train import TrainConfig, train_adapter


def main(out: str) -> None:
    init_from_environment()
    try:
        model, tokenizer = tiny_lora_model(r=1, dtype=torch.float64)
        config = TrainConfig(epochs=1, lr=1.0, batch_size=4, weight_decay=1.0, max_length=128, optimizer="lbfgs")
        train_adapter(model, tokenizer, toy_examples(13, seed=7), config)
        if is_main_process():
            torch.save(AdapterParameters.of(model).flat(), out)
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
