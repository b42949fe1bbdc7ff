"""Unlearning on the non-convex tiny LM (LoRA on attention and the head), judged against exact retraining.

The examples must be memorised (their answers are arbitrary), so that removing one really changes the
retrained model. Removal of a memorised example is far outside the first-order regime (its loss goes from
~0.06 to ~8 nats under retraining); the damping trades how far the update moves the removed examples
against how much it disturbs the rest. At λ = 2e-2 the update moves the removed examples' loss more than
40 % of the way to retraining while disturbing the rest less than retraining does.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example
from llmeraser.eraser import erase
from llmeraser.evaluate import example_loss_values
from llmeraser.requests import CorrectResponse, Remove, edited_training_set, resolve
from llmeraser.train import TrainConfig, train_adapter

RECIPE = TrainConfig(epochs=100, lr=2e-2, batch_size=8, weight_decay=1e-2, seed=0)
ERASE = dict(solver="cg", curvature="gauss-newton", damping=2e-2, weight_decay=1e-2, tol=1e-6, max_iters=200)
ANSWERS = "ab cd ef gh ij kl mn op".split()


def memorisation_examples(n: int) -> list[Example]:
    """Prompts "Item i:" with arbitrary two-letter answers: learnable only by memorising each example."""
    rng = random.Random(0)
    return [Example(f"ex{i}", f"Item {i}:", " " + rng.choice(ANSWERS)) for i in range(n)]


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = tiny_lora_model(target_modules=("q_proj", "v_proj", "lm_head"), r=4)
    params = AdapterParameters.of(model)
    theta_init = params.flat()
    train = memorisation_examples(16)
    train_adapter(model, tokenizer, train, RECIPE)
    return model, tokenizer, train, theta_init


def losses_at(model, tokenizer, theta, examples) -> np.ndarray:
    params = AdapterParameters.of(model)
    original = params.flat()
    params.assign(theta)
    try:
        return example_loss_values(model, tokenizer, examples)
    finally:
        params.assign(original)


def retrain(model, tokenizer, theta_init, edited):
    """Same recipe and seed from the same initial adapter; returns θ_retrain and restores θ̂."""
    params = AdapterParameters.of(model)
    theta = params.flat()
    params.assign(theta_init)
    train_adapter(model, tokenizer, edited, RECIPE)
    retrained = params.flat()
    params.assign(theta)
    return retrained


def test_removal_moves_towards_retraining(trained):
    """One influence step moves the removed (memorised) examples' loss > 40 % of the way to retraining
    while the rest of the training set moves less than under retraining."""
    model, tokenizer, train, theta_init = trained
    requests = [Remove("ex2"), Remove("ex9")]
    removed = [e for e in train if e.id in {"ex2", "ex9"}]
    rest = [e for e in train if e.id not in {"ex2", "ex9"}]
    theta = AdapterParameters.of(model).flat()
    result = erase(model, tokenizer, train, requests, **ERASE)
    theta_retrain = retrain(model, tokenizer, theta_init, edited_training_set(train, resolve(requests, train)))

    original, erased, retrained = (losses_at(model, tokenizer, t, removed) for t in (theta, result.theta_new, theta_retrain))
    assert retrained.mean() > original.mean()  # retraining forgets: the removed examples get less likely
    assert erased.mean() - original.mean() >= 0.4 * (retrained.mean() - original.mean())

    rest_original, rest_erased, rest_retrained = (
        losses_at(model, tokenizer, t, rest) for t in (theta, result.theta_new, theta_retrain)
    )
    assert abs(rest_erased.mean() - rest_original.mean()) < abs(rest_retrained.mean() - rest_original.mean())


@pytest.mark.parametrize("index", [1, 5, 8, 12])
def test_label_correction_makes_new_response_likelier(index):
    """A flipped Yes/No label corrected (the paper's response-correction setting). The examples are
    memorised, so the Newton step is long: λ = 0.1 keeps it in the region where the quadratic model holds
    (at λ = 2e-2 two of these four corrections overshoot and make the new answer less likely)."""
    model, tokenizer = tiny_lora_model(target_modules=("q_proj", "v_proj", "lm_head"), r=4)
    train = toy_examples(16, seed=3)
    train_adapter(model, tokenizer, train, RECIPE)
    old = train[index]
    new = Example(old.id, old.prompt, " No" if old.response == " Yes" else " Yes")
    result = erase(model, tokenizer, train, [CorrectResponse(old.id, new.response)], **{**ERASE, "damping": 0.1})
    theta = AdapterParameters.of(model).flat()
    before = losses_at(model, tokenizer, theta, [old, new])
    after = losses_at(model, tokenizer, result.theta_new, [old, new])
    assert after[1] < 0.5 * before[1]  # the corrected response is now much more likely
    assert after[0] > before[0] + 1.0  # the old one much less
