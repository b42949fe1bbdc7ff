"""Metrics: answer scores (one-pass and two-pass agree), ensemble losses and distances, membership AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example
from llmeraser.evaluate import (
    answer_log_likelihoods,
    answer_scores,
    example_loss_values,
    function_space_distance,
    membership_auc,
    response_predictions,
    single_token_id,
)


def _prompts() -> list[Example]:
    return [Example(f"e{i}", "Q" * (3 + 2 * i) + " liked? A:", " Y" if i % 2 else " N") for i in range(5)]


def test_single_token_answer_scores_equal_the_two_pass_difference(tiny_model) -> None:
    model, tokenizer = tiny_model
    examples = _prompts()
    assert single_token_id(tokenizer, "Y") is not None and single_token_id(tokenizer, " Y") is None
    fast = answer_scores(model, tokenizer, examples, positive="Y", negative="N", batch_size=2)
    prompts = [e.prompt for e in examples]
    slow = answer_log_likelihoods(model, tokenizer, prompts, "Y") - answer_log_likelihoods(model, tokenizer, prompts, "N")
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    # multi-token answers take the two-pass path
    multi = answer_scores(model, tokenizer, examples, positive=" Yes", negative=" No")
    expected = (answer_log_likelihoods(model, tokenizer, prompts, " Yes")
                - answer_log_likelihoods(model, tokenizer, prompts, " No"))
    np.testing.assert_allclose(multi, expected, rtol=1e-6)


def test_response_predictions_match_losses_scores_and_distances(tiny_model) -> None:
    model, tokenizer = tiny_model
    params = AdapterParameters.of(model)
    theta = params.flat()
    other = theta + 0.5 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    examples = _prompts()
    mine = response_predictions(model, tokenizer, examples, theta, batch_size=2)
    torch.testing.assert_close(params.flat(), theta)
    np.testing.assert_allclose(mine.losses(), example_loss_values(model, tokenizer, examples), rtol=1e-5)
    # position 0 is P(· | prompt): the one-pass Yes/No score
    y, n = single_token_id(tokenizer, "Y"), single_token_id(tokenizer, "N")
    np.testing.assert_allclose(
        mine.first_token_scores(y, n), answer_scores(model, tokenizer, examples, positive="Y", negative="N"), rtol=1e-4, atol=1e-5
    )
    theirs = response_predictions(model, tokenizer, examples, other)
    expected = function_space_distance(model, tokenizer, examples, theta, other)["kl"]
    assert mine.kl_to(theirs).mean() == pytest.approx(expected, rel=1e-4)
    assert mine.kl_to(mine).max() == pytest.approx(0.0, abs=1e-7)
    # an ensemble is the mixture of the members' distributions
    single_b = theirs.losses()
    mixture = response_predictions(model, tokenizer, examples, [theta, other]).losses()
    # −log((p+q)/2) ≤ (−log p − log q)/2 per token (Jensen) and ≥ min(−log p, −log q) − log 2
    assert np.all(mixture <= (mine.losses() + single_b) / 2 + 1e-6)
    assert np.all(mixture >= np.minimum(mine.losses(), single_b) - np.log(2) - 1e-6)
    assert function_space_distance(model, tokenizer, examples, [theta, theta], theta)["kl"] == pytest.approx(0.0, abs=1e-9)
    d_mix = function_space_distance(model, tokenizer, examples, theta, [theta, other])["kl"]
    assert 0.0 < d_mix < expected
    assert mine.subset([1, 3]).losses() == pytest.approx(mine.losses()[[1, 3]])


def test_membership_auc() -> None:
    assert membership_auc(np.array([0.1, 0.2]), np.array([1.0, 2.0])) == 1.0
    assert membership_auc(np.array([1.0, 2.0]), np.array([0.1, 0.2])) == 0.0
    assert membership_auc(np.array([1.0, 0.1]), np.array([1.0, 0.1])) == 0.5
