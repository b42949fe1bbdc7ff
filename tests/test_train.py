"""The training recipe: learning-rate schedules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.data import TokenizationConfig, tokenize_example
from llmeraser.requests import CorrectResponse, Remove, edited_training_set, resolve
from llmeraser.train import TrainConfig, batch_schedule, lr_multiplier, objective_and_gradient, paired_schedule, train_adapter


def test_lr_multipliers() -> None:
    assert [lr_multiplier("linear", 4)(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_multiplier("constant", 4)(t) for t in range(4)] == [1.0] * 4
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier("cosine", 4)


def recorded_adam_lrs(monkeypatch) -> list[float]:
    """The learning rate of every Adam step taken from now on (appended as the steps run)."""
    seen: list[float] = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return seen


def test_adam_steps_use_the_scheduled_lr(monkeypatch) -> None:
    seen = recorded_adam_lrs(monkeypatch)
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    recipe = TrainConfig(epochs=2, lr=4e-2, batch_size=4, max_length=64, lr_schedule="linear")
    result = train_adapter(model, tokenizer, toy_examples(8), recipe)
    assert result.steps == 4
    assert seen == pytest.approx([4e-2, 3e-2, 2e-2, 1e-2])
    seen.clear()
    train_adapter(model, tokenizer, toy_examples(8), dataclasses.replace(recipe, lr_schedule="constant"))
    assert seen == pytest.approx([4e-2] * 4)


def test_batch_schedule_is_the_training_order() -> None:
    recipe = TrainConfig(epochs=3, batch_size=4, seed=5)
    schedule = batch_schedule(10, recipe)
    assert len(schedule) == 3 * 3 and [len(b) for b in schedule[:3]] == [4, 4, 2]
    for epoch in range(3):  # every epoch is a permutation of all examples
        assert sorted(i for batch in schedule[3 * epoch : 3 * epoch + 3] for i in batch) == list(range(10))
    assert batch_schedule(10, recipe) == schedule
    assert batch_schedule(10, dataclasses.replace(recipe, seed=6)) != schedule


_OBJECTIVE_AND_GRADIENT = objective_and_gradient


def _recorded_batches(monkeypatch, model, tokenizer, examples, recipe, schedule=None) -> list[list[str]]:
    """The ids of the examples in every optimiser step of ``train_adapter``, in step order."""
    import llmeraser.train as train_module

    by_tokens = {tokenize_example(tokenizer, e, TokenizationConfig(recipe.max_length)).input_ids: e.id for e in examples}
    steps: list[list[str]] = []
    original = _OBJECTIVE_AND_GRADIENT

    def recording(model, params, items, *args, **kwargs):
        steps.append([by_tokens[item.input_ids] for item in items])
        return original(model, params, items, *args, **kwargs)

    monkeypatch.setattr(train_module, "objective_and_gradient", recording)
    train_adapter(model, tokenizer, examples, recipe, schedule=schedule)
    return steps


def test_paired_retrain_keeps_every_surviving_example_in_its_batch(monkeypatch) -> None:
    """The retrain sees the original's batches with the removed examples dropped and the edited one
    substituted in place: every surviving example at the same step with the same batch mates."""
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    train = toy_examples(12)
    recipe = TrainConfig(epochs=2, lr=1e-2, batch_size=4, max_length=64, seed=3, lr_schedule="linear")
    requests = [Remove("ex2"), Remove("ex7"), Remove("ex9"), CorrectResponse("ex4", " Maybe")]
    edited = edited_training_set(train, resolve(requests, train))
    params = AdapterParameters.of(model)
    theta_init = params.flat()
    original = _recorded_batches(monkeypatch, model, tokenizer, train, recipe)
    params.assign(theta_init)
    schedule = paired_schedule([e.id for e in train], [e.id for e in edited], recipe)
    paired = _recorded_batches(monkeypatch, model, tokenizer, edited, recipe, schedule)
    removed = {"ex2", "ex7", "ex9"}
    expected = [[i for i in batch if i not in removed] for batch in original]
    assert paired == [batch for batch in expected if batch]  # ex4 (corrected) keeps its place
    assert sum(len(b) for b in paired) == 2 * len(edited)
    # an unpaired retrain of "the same seed" draws another permutation over fewer examples
    params.assign(theta_init)
    unpaired = _recorded_batches(monkeypatch, model, tokenizer, edited, recipe)
    assert unpaired != paired


def test_an_emptied_batch_skips_its_step_but_keeps_the_lr_schedule(monkeypatch) -> None:
    seen = recorded_adam_lrs(monkeypatch)
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    recipe = TrainConfig(epochs=1, lr=4e-2, batch_size=2, max_length=64, lr_schedule="linear")
    result = train_adapter(model, tokenizer, toy_examples(4), recipe, schedule=[[0, 1], [], [2], [3]])
    assert result.steps == 3
    assert seen == pytest.approx([4e-2, 2e-2, 1e-2])  # the emptied second step's lr (3e-2) is never used


def test_paired_schedule_refuses_unknown_ids() -> None:
    with pytest.raises(ValueError, match="not in the original"):
        paired_schedule(["a", "b"], ["a", "c"], TrainConfig(epochs=1))
