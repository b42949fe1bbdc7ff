"""Membership-inference attacks (``bench.attacks``) against hand computations on a fixture."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from llmeraser.data import Example
from llmeraser.evaluate import ResponsePredictions
from llmeraser_bench.attacks import attack_auc, membership_attacks, min_k_plus_plus, reference_scores, zlib_scores


def fixture() -> ResponsePredictions:
    """Two examples over a 3-token vocabulary: 2 and 1 response positions."""
    first = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    second = torch.log(torch.tensor([[0.1, 0.1, 0.8]]))
    return ResponsePredictions([first, second], [torch.tensor([0, 1]), torch.tensor([0])])


def z(probs: list[float], index: int) -> float:
    logs = [math.log(p) for p in probs]
    mu = sum(p * lp for p, lp in zip(probs, logs))
    sigma = math.sqrt(sum(p * lp * lp for p, lp in zip(probs, logs)) - mu * mu)
    return (logs[index] - mu) / sigma


def test_min_k_plus_plus_by_hand() -> None:
    expected_first = [z([0.7, 0.2, 0.1], 0), z([0.5, 0.25, 0.25], 1)]
    # k = 0.5 of 2 positions: the lowest one; of 1 position: at least one
    scores = min_k_plus_plus(fixture(), k=0.5)
    assert scores == pytest.approx([min(expected_first), z([0.1, 0.1, 0.8], 0)], rel=1e-5)
    assert min_k_plus_plus(fixture(), k=1.0)[0] == pytest.approx(np.mean(expected_first), rel=1e-5)


def test_zlib_ratio_by_hand() -> None:
    examples = [Example("a", "q", " 555-0142"), Example("b", "q", " Yes")]
    nll_first = -(math.log(0.7) + math.log(0.25))  # total over 2 tokens
    nll_second = -math.log(0.1)
    expected = [-nll_first / len(zlib.compress(b" 555-0142")), -nll_second / len(zlib.compress(b" Yes"))]
    assert zlib_scores(fixture(), examples) == pytest.approx(expected, rel=1e-5)


def test_reference_attack_and_auc() -> None:
    predictions = fixture()
    assert reference_scores(predictions, predictions) == pytest.approx([0.0, 0.0])
    assert attack_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert attack_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    examples = [Example("a", "q", " 555-0142"), Example("b", "q", " Yes")]
    # the reference itself: every reference score is 0, the attack cannot tell (AUC 0.5)
    result = membership_attacks(predictions, examples, predictions, examples, predictions, predictions)
    assert result["mia_reference"] == 0.5 and set(result) == {"mia_minkpp", "mia_zlib", "mia_reference"}
