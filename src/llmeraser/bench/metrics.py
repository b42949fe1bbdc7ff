"""How each method's adapter (or ensemble of adapters) is scored on the benchmark's evaluation sets.

- ``test_auc``: ROC AUC of the Yes/No score on the test set (ensembles: the mean of the members' scores).
- ``loss_old``: mean loss (nats per token) of the edited examples' training-set versions (removed examples,
  noisy prompts, flipped labels): forgetting shows as a rise towards the retrained model's value.
- ``loss_new`` / ``accuracy_new`` (query, response): mean loss of the corrected versions and the fraction
  of them whose Yes/No answer (score > 0 means Yes) is the corrected one.
- ``mia_auc``: loss-based membership inference, edited examples' old versions (members of the original
  training set) against non-members never trained on; 0.5 means the attack cannot tell them apart.
- ``kl_test`` / ``kl_edited``: KL(retrain ‖ method) in nats per token on the response positions of the test
  set and of the edited examples (old and new versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from llmeraser.data import Example
from llmeraser.evaluate import (
    answer_scores,
    auc,
    binary_labels,
    ensemble_loss_values,
    function_space_distance,
    membership_auc,
)
from llmeraser.model import AdapterParameters


@dataclass(frozen=True)
class EvalSets:
    """``test``: held-out examples; ``old``/``new``: the edited examples before and after their requests
    (``new`` is empty for removals); ``nonmembers``: training-distribution examples no model trained on."""

    test: list[Example]
    old: list[Example]
    new: list[Example]
    nonmembers: list[Example]

    @property
    def edited(self) -> list[Example]:
        return [*self.old, *self.new]


def ensemble_scores(
    model: Any, tokenizer: Any, examples: Sequence[Example], thetas: Sequence[Tensor], max_length: int
) -> np.ndarray:
    """Mean over ``thetas`` of the Yes/No answer scores, shape (n,); the model's θ is restored."""
    params = AdapterParameters.of(model)
    original = params.flat()
    try:
        total = np.zeros(len(examples))
        for theta in thetas:
            params.assign(theta)
            total += answer_scores(model, tokenizer, examples, max_length=max_length)
    finally:
        params.assign(original)
    return total / len(thetas)


def score_method(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], sets: EvalSets, theta_retrain: Tensor, max_length: int
) -> dict[str, float]:
    """The metrics of the module docstring for the model under ``thetas`` (one adapter, or an ensemble)."""
    scores = ensemble_scores(model, tokenizer, sets.test, thetas, max_length)
    loss_old = ensemble_loss_values(model, tokenizer, sets.old, thetas, max_length)
    loss_nonmembers = ensemble_loss_values(model, tokenizer, sets.nonmembers, thetas, max_length)
    metrics = {
        "test_auc": auc(binary_labels(sets.test), scores),
        "loss_old": float(loss_old.mean()),
        "mia_auc": membership_auc(loss_old, loss_nonmembers),
        "kl_test": function_space_distance(model, tokenizer, sets.test, theta_retrain, thetas, max_length)["kl"],
        "kl_edited": function_space_distance(model, tokenizer, sets.edited, theta_retrain, thetas, max_length)["kl"],
    }
    if sets.new:
        new_scores = ensemble_scores(model, tokenizer, sets.new, thetas, max_length)
        metrics["loss_new"] = float(ensemble_loss_values(model, tokenizer, sets.new, thetas, max_length).mean())
        metrics["accuracy_new"] = float(((new_scores > 0).astype(int) == binary_labels(sets.new)).mean())
    return metrics
