"""Membership-inference attacks beyond the loss: is an erased example really forgotten?

Every attack gives each example a score, higher = "more likely trained on", computed from a model's
response predictions (``llmeraser.evaluate.ResponsePredictions``); its ROC AUC at telling the edited
examples (members before the erase) from never-trained ones is the attack's success (0.5: cannot tell).

- ``loss``: −mean NLL per response token (the classic attack; ``membership_auc``).
- ``min_k_plus_plus`` (Min-K%++, Zhang et al. 2024): per response position t with true token x_t,
  z_t = (log p(x_t) − μ_t) / σ_t with μ_t = E_{v∼p_t} log p_t(v) and σ_t² = Var_{v∼p_t} log p_t(v); the
  score is the mean of the lowest ``k`` fraction of the z_t (at least one position).
- ``zlib`` (Carlini et al. 2021): −(total NLL of the response, nats) / (zlib-compressed length of the
  response text in bytes): a text that is easy to compress is unlikely anyway, whatever the model saw.
- ``reference``: the retrained model as the reference, loss_reference − loss_model: what the model knows
  about an example beyond what a model that never saw it knows (0 for the reference itself).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from llmeraser.data import Example
from llmeraser.evaluate import ResponsePredictions, auc


def min_k_plus_plus(predictions: ResponsePredictions, k: float = 0.2) -> np.ndarray:
    """Min-K%++ scores, shape (n,), of the module docstring."""
    scores = []
    for log_probs, targets in zip(predictions.log_probs, predictions.targets):
        lp = log_probs.double()
        p = lp.exp()
        mu = (p * lp).sum(-1)
        sigma = ((p * lp * lp).sum(-1) - mu * mu).clamp_min(1e-12).sqrt()
        z = (lp.gather(1, targets[:, None])[:, 0] - mu) / sigma
        count = max(1, math.floor(k * len(z)))
        scores.append(float(z.sort().values[:count].mean()))
    return np.array(scores)


def zlib_scores(predictions: ResponsePredictions, examples: Sequence[Example]) -> np.ndarray:
    """zlib-ratio scores, shape (n,): −(mean NLL × response tokens) / zlib length of the response (bytes)."""
    losses = predictions.losses()
    tokens = np.array([len(t) for t in predictions.targets])
    compressed = np.array([len(zlib.compress(e.response.encode("utf-8"))) for e in examples])
    return -(losses * tokens) / compressed


def reference_scores(predictions: ResponsePredictions, reference: ResponsePredictions) -> np.ndarray:
    """Reference-model scores, shape (n,): loss under the reference (the retrained model) − loss under the model."""
    return reference.losses() - predictions.losses()


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of the scores at telling members (label 1) from non-members (label 0)."""
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    return auc(labels, np.concatenate([member_scores, nonmember_scores]))


def membership_attacks(
    members: ResponsePredictions, member_examples: Sequence[Example], nonmembers: ResponsePredictions,
    nonmember_examples: Sequence[Example], reference_members: ResponsePredictions,
    reference_nonmembers: ResponsePredictions, k: float = 0.2,
) -> dict[str, float]:
    """The AUC of Min-K%++, zlib and the reference attack (``mia_minkpp``, ``mia_zlib``, ``mia_reference``)."""
    return {
        "mia_minkpp": attack_auc(min_k_plus_plus(members, k), min_k_plus_plus(nonmembers, k)),
        "mia_zlib": attack_auc(zlib_scores(members, member_examples), zlib_scores(nonmembers, nonmember_examples)),
        "mia_reference": attack_auc(reference_scores(members, reference_members),
                                    reference_scores(nonmembers, reference_nonmembers)),
    }
