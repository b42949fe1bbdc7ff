"""The training recipe: learning-rate schedules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_lora_model, toy_examples
from llmeraser.train import TrainConfig, lr_multiplier, train_adapter


def test_lr_multipliers() -> None:
    assert [lr_multiplier("linear", 4)(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_multiplier("constant", 4)(t) for t in range(4)] == [1.0] * 4
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier("cosine", 4)


def test_adam_steps_use_the_scheduled_lr(monkeypatch) -> None:
    seen: list[float] = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    recipe = TrainConfig(epochs=2, lr=4e-2, batch_size=4, max_length=64, lr_schedule="linear")
    result = train_adapter(model, tokenizer, toy_examples(8), recipe)
    assert result.steps == 4
    assert seen == pytest.approx([4e-2, 3e-2, 2e-2, 1e-2])
    seen.clear()
    train_adapter(model, tokenizer, toy_examples(8), dataclasses.replace(recipe, lr_schedule="constant"))
    assert seen == pytest.approx([4e-2] * 4)
