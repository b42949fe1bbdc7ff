"""Gradients of the per-example loss and the influence right-hand side b, against manual loops."""

from __future__ import annotations

import pytest
import torch
from conftest import exact_float64_llama, one_thread, perturbed_model, toy_examples

from llmeraser.data import (
    Example,
    TokenizationConfig,
    tokenize_example,
    tokenize_examples,
)
from llmeraser.gradients import influence_rhs, per_example_gradients, summed_gradient

CONFIG = TokenizationConfig(max_length=64)


@pytest.fixture(scope="module", autouse=True)
def float64_llama():
    with exact_float64_llama(), one_thread():
        yield


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj"), r=1, seed=2)
    examples = toy_examples(5, seed=3) + [Example("long", "A much longer prompt than the others, padded less?", " Maybe not")]
    items = tokenize_examples(tokenizer, examples, CONFIG)
    assert len({len(i.input_ids) for i in items}) > 2  # batches really are padded
    return model, tokenizer, params, examples, items


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def manual_gradient(model, params, item):
    """∇ of the mean response-token NLL of one unpadded example, computed from the logits by hand."""
    ids = torch.tensor([item.input_ids])
    with torch.enable_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        positions = range(item.prompt_length, len(item.input_ids))
        loss = -torch.stack([log_probs[t - 1, item.input_ids[t]] for t in positions]).mean()
        grads = torch.autograd.grad(loss, params.tensors)
    return params.flatten(grads)


@pytest.fixture(scope="module")
def per_example(setup):
    model, _, params, _, items = setup
    return [manual_gradient(model, params, item) for item in items]


def test_single_example_gradient_matches_manual_loss(setup, per_example):
    model, tokenizer, params, _, items = setup
    for item, manual in zip(items, per_example):
        assert relative_error(summed_gradient(model, params, [item], tokenizer.pad_token_id), manual) < 1e-12


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_padded_batches_sum_single_example_gradients(setup, per_example, batch_size):
    model, tokenizer, params, _, items = setup
    total = summed_gradient(model, params, items, tokenizer.pad_token_id, batch_size=batch_size)
    assert relative_error(total, sum(per_example)) < 1e-10


def test_signs_weight_each_example(setup, per_example):
    model, tokenizer, params, _, items = setup
    signs = [1.0, -1.0, 0.5, 0.0, 2.0, -0.25]
    weighted = summed_gradient(model, params, items, tokenizer.pad_token_id, batch_size=4, signs=signs)
    expected = sum(s * g for s, g in zip(signs, per_example))
    assert relative_error(weighted, expected) < 1e-10


def test_gradient_leaves_theta_unchanged(setup):
    model, tokenizer, params, _, items = setup
    theta = params.flat()
    summed_gradient(model, params, items, tokenizer.pad_token_id)
    assert torch.equal(params.flat(), theta)
    assert all(t.grad is None for t in params.tensors)  # autograd.grad, not .backward(): nothing accumulates


def edits(setup):
    """Remove example 0, re-prompt example 1, correct the response of example 2."""
    model, tokenizer, params, examples, items = setup
    new_prompt = Example(examples[1].id, "Is 'sun moon star' nice?", examples[1].response)
    flipped = " No" if examples[2].response == " Yes" else " Yes"
    new_response = Example(examples[2].id, examples[2].prompt, flipped)
    old = [items[0], items[1], items[2]]
    new = [tokenize_example(tokenizer, new_prompt, CONFIG), tokenize_example(tokenizer, new_response, CONFIG)]
    return old, new


def test_paper_scaling(setup, per_example):
    model, tokenizer, params, _, _ = setup
    old, new = edits(setup)
    n = 10
    b = influence_rhs(model, params, old, new, n, tokenizer.pad_token_id, weight_decay=0.1, scaling="paper", batch_size=2)
    new_grads = [manual_gradient(model, params, item) for item in new]
    expected = (per_example[0] + (per_example[1] - new_grads[0]) + (per_example[2] - new_grads[1])) / n
    assert relative_error(b, expected) < 1e-10  # no weight-decay term in the paper's form


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_retrain_scaling(setup, per_example, weight_decay):
    model, tokenizer, params, _, items = setup
    old, new = edits(setup)
    n, theta = 10, params.flat()
    new_grads = [manual_gradient(model, params, item) for item in new]
    # One removal among three edits: m = n - 1.
    b = influence_rhs(model, params, old, new, n, tokenizer.pad_token_id, weight_decay=weight_decay)
    edit_sum = per_example[0] + (per_example[1] - new_grads[0]) + (per_example[2] - new_grads[1])
    expected = edit_sum / (n - 1) + (1 / (n - 1)) * weight_decay * theta
    assert relative_error(b, expected) < 1e-10
    # Three removals: m = n - 3, and the weight-decay term counts k = 3.
    b3 = influence_rhs(model, params, items[:3], [], n, tokenizer.pad_token_id, weight_decay=weight_decay)
    expected3 = sum(per_example[:3]) / (n - 3) + (3 / (n - 3)) * weight_decay * theta
    assert relative_error(b3, expected3) < 1e-10
    # No removals: plain 1/n and no weight-decay term.
    b0 = influence_rhs(model, params, old[1:], new, n, tokenizer.pad_token_id, weight_decay=weight_decay)
    assert relative_error(b0, (edit_sum - per_example[0]) / n) < 1e-10


def test_removal_rhs_points_along_the_removed_gradient(setup, per_example):
    model, tokenizer, params, _, items = setup
    for scaling in ("retrain", "paper"):
        b = influence_rhs(model, params, [items[3]], [], 6, tokenizer.pad_token_id, weight_decay=0.0, scaling=scaling)
        assert float(b @ per_example[3]) > 0
        cosine = float(torch.nn.functional.cosine_similarity(b, per_example[3], dim=0))
        assert cosine == pytest.approx(1.0, abs=1e-12)


def test_unknown_scaling_is_rejected(setup):
    model, tokenizer, params, _, items = setup
    with pytest.raises(ValueError, match="unknown scaling 'exact'"):
        influence_rhs(model, params, items[:1], [], 6, tokenizer.pad_token_id, scaling="exact")


@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_vectorised_per_example_gradients_equal_the_loop(setup, per_example, chunk_size):
    """vmap(grad) over padded chunks (lengths differ within a chunk) = one unpadded backward pass each."""
    model, tokenizer, params, _, items = setup
    rows = per_example_gradients(model, params, items, tokenizer.pad_token_id, chunk_size=chunk_size)
    assert rows.shape == (len(items), params.dim)
    torch.testing.assert_close(rows, torch.stack(per_example), rtol=1e-10, atol=1e-14)


def test_vectorised_gradients_of_an_unpadded_chunk_and_in_float32():
    """Same-length examples (an all-ones attention mask) and the default float32 model, rtol 1e-5."""
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj"), r=2, seed=4)
    model.to(torch.float32)
    examples = toy_examples(3, seed=1) + [Example("x", "A longer prompt here?", " No")]
    items = tokenize_examples(tokenizer, examples, CONFIG)
    rows = per_example_gradients(model, params, items, tokenizer.pad_token_id, chunk_size=4)
    assert rows.dtype == torch.float32
    loop = torch.stack([summed_gradient(model, params, [item], tokenizer.pad_token_id) for item in items])
    torch.testing.assert_close(rows, loop, rtol=1e-5, atol=1e-6)
    same = per_example_gradients(model, params, [items[0]] * 3, tokenizer.pad_token_id, chunk_size=3)
    torch.testing.assert_close(same, loop[:1].expand(3, -1), rtol=1e-5, atol=1e-6)
