"""Sign and scale against exact retraining on a strongly convex problem.

LoRA on the output head only with ``lora_A`` frozen: the logits are linear in ``lora_B`` and the loss,
with L2 regularisation, is strongly convex in θ = ``lora_B``. Training to convergence then has a unique
answer, so the influence update must match the true change θ_retrain − θ̂.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.eraser import erase
from llmeraser.requests import (
    CorrectResponse,
    ModifyQuery,
    Remove,
    edited_training_set,
    resolve,
)
from llmeraser.train import TrainConfig, train_adapter

WEIGHT_DECAY = 1e-2
RECIPE = TrainConfig(epochs=6, lr=1.0, batch_size=32, weight_decay=WEIGHT_DECAY, optimizer="lbfgs")


def convex_head_model():
    model, tokenizer = tiny_lora_model(target_modules=("lm_head",), r=2)
    for name, tensor in model.named_parameters():
        if "lora_A" in name:
            tensor.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = convex_head_model()
    train = toy_examples(40, seed=1)
    train_adapter(model, tokenizer, train, RECIPE)
    return model, tokenizer, train


def retrained_change(model, tokenizer, train, requests):
    """θ_retrain − θ̂: train from θ̂ on the edited set to convergence (unique minimiser), then restore θ̂."""
    params = AdapterParameters.of(model)
    theta = params.flat()
    edited = edited_training_set(train, resolve(requests, train))
    train_adapter(model, tokenizer, edited, RECIPE)
    change = params.flat() - theta
    params.assign(theta)
    return change


def assert_matches(update: torch.Tensor, change: torch.Tensor) -> None:
    cosine = float(torch.nn.functional.cosine_similarity(update, change, dim=0))
    relative_error = float((update - change).norm() / change.norm())
    assert cosine >= 0.99, f"cosine {cosine:.4f}"
    assert relative_error <= 0.05, f"relative error {relative_error:.4f}"


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_removal_matches_retraining(trained, curvature):
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7"), Remove("ex20")]
    change = retrained_change(model, tokenizer, train, requests)
    result = erase(
        model, tokenizer, train, requests, solver="cg", curvature=curvature, damping=0.0,
        weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300, batch_size=32,
    )
    assert_matches(result.update, change)


def test_modified_query_matches_retraining(trained):
    model, tokenizer, train = trained
    requests = [ModifyQuery("ex5", "Is 'moon star tree' nice?")]
    change = retrained_change(model, tokenizer, train, requests)
    result = erase(model, tokenizer, train, requests, solver="cg", damping=0.0, weight_decay=WEIGHT_DECAY,
                   tol=1e-10, max_iters=300, batch_size=32)
    assert_matches(result.update, change)


def test_corrected_response_matches_retraining(trained):
    model, tokenizer, train = trained
    flipped = " No" if train[11].response == " Yes" else " Yes"
    requests = [CorrectResponse("ex11", flipped)]
    change = retrained_change(model, tokenizer, train, requests)
    result = erase(model, tokenizer, train, requests, solver="cg", damping=0.0, weight_decay=WEIGHT_DECAY,
                   tol=1e-10, max_iters=300, batch_size=32)
    assert_matches(result.update, change)


def test_paper_scaling_is_first_order_close(trained):
    """With weight decay, the paper's 1/n form drops a term of the same order as the removal effect
    (docs/method.md, "The influence update"): the default "retrain" scaling must be markedly closer to the retrained change."""
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7"), Remove("ex20")]
    change = retrained_change(model, tokenizer, train, requests)
    common = dict(solver="cg", damping=0.0, weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300, batch_size=32)
    exact = erase(model, tokenizer, train, requests, scaling="retrain", **common).update
    paper = erase(model, tokenizer, train, requests, scaling="paper", **common).update
    exact_error = float((exact - change).norm() / change.norm())
    paper_error = float((paper - change).norm() / change.norm())
    assert exact_error <= 0.05
    assert paper_error > 4 * exact_error, (exact_error, paper_error)
