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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example
from llmeraser.evaluate import (
    ResponsePredictions,
    answer_scores,
    auc,
    binary_labels,
    membership_auc,
    response_predictions,
    single_token_id,
)
from llmeraser_bench.attacks import membership_attacks


@dataclass(frozen=True)
class EvalSets:
    """``test``: held-out examples; ``old``/``new``: the edited examples before and after their requests
    (``new`` is empty for removals); ``nonmembers``: training-distribution examples no model trained on (the
    membership-inference attack's); ``holdout``: further never-trained examples that the trust-region erase
    may look at (its held-out check and never-seen level), kept apart from everything that is scored;
    ``relearn``: kept training examples the relearning attack fine-tunes on (``bench.robustness``)."""

    test: list[Example]
    old: list[Example]
    new: list[Example]
    nonmembers: list[Example]
    holdout: list[Example] = field(default_factory=list)
    relearn: list[Example] = field(default_factory=list)

    @property
    def edited(self) -> list[Example]:
        return [*self.old, *self.new]


@dataclass
class SetPredictions:
    """A method's response predictions on each evaluation set (``edited``: old versions, then new)."""

    test: ResponsePredictions
    edited: ResponsePredictions
    nonmembers: ResponsePredictions


def predict_sets(model: Any, tokenizer: Any, thetas: Sequence[Tensor], sets: EvalSets, max_length: int) -> SetPredictions:
    """One forward pass per batch, set and θ (ensembles: the mixture of the members' distributions)."""
    return SetPredictions(*(response_predictions(model, tokenizer, examples, thetas, max_length)
                            for examples in (sets.test, sets.edited, sets.nonmembers)))


def ensemble_scores(
    model: Any, tokenizer: Any, examples: Sequence[Example], thetas: Sequence[Tensor], max_length: int,
    predictions: ResponsePredictions | None = None,
) -> np.ndarray:
    """Yes/No scores, shape (n,): from ``predictions`` (the mixture's answer-position distribution) when
    " Yes" and " No" are single tokens, else the mean over ``thetas`` of the two-pass answer scores."""
    yes, no = single_token_id(tokenizer, " Yes"), single_token_id(tokenizer, " No")
    if predictions is not None and yes is not None and no is not None:
        return predictions.first_token_scores(yes, no)
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


def shared_metrics(sets: EvalSets, predictions: SetPredictions, reference: SetPredictions) -> dict[str, float]:
    """What every TALLRec-style task reports: the edited examples' old versions' loss (``loss_old``), the
    test loss, the membership attacks on the old versions against the non-members, and KL(retrain ‖ method)
    per token on the test and edited sets."""
    n_old = len(sets.old)
    edited_losses = predictions.edited.losses()
    return {
        "loss_old": float(edited_losses[:n_old].mean()),
        "loss_test": float(predictions.test.losses().mean()),
        "mia_auc": membership_auc(edited_losses[:n_old], predictions.nonmembers.losses()),
        **membership_attacks(predictions.edited.subset(range(n_old)), sets.old, predictions.nonmembers, sets.nonmembers,
                             reference.edited.subset(range(n_old)), reference.nonmembers),
        "kl_test": float(reference.test.kl_to(predictions.test).mean()),
        "kl_edited": float(reference.edited.kl_to(predictions.edited).mean()),
    }


def score_method(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], sets: EvalSets, predictions: SetPredictions,
    reference: SetPredictions, max_length: int,
) -> dict[str, float]:
    """The metrics of the module docstring from a method's ``predictions`` and the retrained model's
    (``reference``); Yes/No scores may need extra passes (see ``ensemble_scores``)."""
    n_old = len(sets.old)
    edited_losses = predictions.edited.losses()
    scores = ensemble_scores(model, tokenizer, sets.test, thetas, max_length, predictions.test)
    metrics = {"test_auc": auc(binary_labels(sets.test), scores), **shared_metrics(sets, predictions, reference)}
    if sets.new:
        new_predictions = predictions.edited.subset(range(n_old, len(sets.edited)))
        new_scores = ensemble_scores(model, tokenizer, sets.new, thetas, max_length, new_predictions)
        metrics["loss_new"] = float(edited_losses[n_old:].mean())
        metrics["accuracy_new"] = float(((new_scores > 0).astype(int) == binary_labels(sets.new)).mean())
    return metrics
