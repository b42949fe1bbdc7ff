"""Is it really forgotten? The quantisation check and the relearning attack on a method's adapter.

Both change the model the way a user of the published adapter could, then measure the same forgetting metrics
on the examples that should be forgotten (``forgotten``: the removed examples; for query and response tasks the
training-set versions that were edited), against the same non-members as the loss attack:

- ``loss_removed_<attack>``: their mean loss (nats per token; −the log-likelihood per answer token);
- ``mia_<attack>``: loss-based membership inference AUC, forgotten examples against non-members;
- ``extract_removed_<attack>`` (``pii``): greedy-decoding exact-match extraction rate of their answers.

Attacks (``<attack>``):

- ``q8``, ``q4`` (``bench.quantise``): the adapter merged into the base weights of the adapted modules, each
  merged matrix rounded per output channel at 8 / 4 bits (symmetric round-to-nearest);
- ``relearn``: ``steps`` full-batch Adam steps at the recipe's learning rate (constant, the recipe's weight decay)
  from the adapter on a small related set (``relearn_set``: kept examples of the same users or people as the
  forgotten ones, topped up with other kept examples), then the metrics: does the forgotten data come back?

The retrained model is treated the same way; a method forgets only if no attack finds more on it than on Retrain.
An ensemble (SISA) is attacked member by member: the mixture of the attacked members' predictions is scored, and
an answer counts as extracted when any attacked member produces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example
from llmeraser.evaluate import ResponsePredictions, membership_auc, response_predictions
from llmeraser.train import TrainConfig, train_adapter
from llmeraser_bench.pii import answer_rate, greedy_answers
from llmeraser_bench.quantise import quantised_merged


def owner(example_id: str) -> str:
    """The user or person of an example id ``<owner>-<index>`` (``u17-3`` → ``u17``, ``p003-phone`` → ``p003``)."""
    return example_id.rsplit("-", 1)[0]


def relearn_set(kept: Sequence[Example], forgotten: Sequence[Example], size: int, seed: int = 0) -> list[Example]:
    """``size`` kept examples (fewer if there are fewer): those whose owner owns a forgotten example first (a
    seeded sample when there are more), topped up with a seeded sample of the other kept examples, so the
    attack has the same strength whether or not the forgotten examples' owners kept any examples."""
    rng = random.Random(f"{seed}:relearn")
    owners = {owner(e.id) for e in forgotten}
    related = [e for e in kept if owner(e.id) in owners]
    others = [e for e in kept if owner(e.id) not in owners]
    chosen = rng.sample(related, min(size, len(related)))
    return chosen + rng.sample(others, min(size - len(chosen), len(others)))


def relearn_config(recipe: TrainConfig, steps: int, n_examples: int) -> TrainConfig:
    """``steps`` full-batch steps (one epoch each) at the recipe's lr, constant, with its weight decay and seed."""
    return dataclasses.replace(recipe, epochs=steps, batch_size=max(n_examples, 1), lr_schedule="constant", optimizer="adam")


def mixture(parts: Sequence[ResponsePredictions]) -> ResponsePredictions:
    """The equal-weight mixture of several models' predictions on the same examples."""
    if len(parts) == 1:
        return parts[0]
    log_probs = [torch.logsumexp(torch.stack([p.log_probs[i].double() for p in parts]), dim=0) - math.log(len(parts))
                 for i in range(len(parts[0].log_probs))]
    return ResponsePredictions([lp.float() for lp in log_probs], parts[0].targets)


State = Callable[[Tensor], contextlib.AbstractContextManager[Any]]


def measure_forgetting(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], state: State, forgotten: Sequence[Example],
    nonmembers: Sequence[Example], max_length: int, extract: bool, suffix: str,
) -> dict[str, float]:
    """The module docstring's metrics (named with ``suffix``) of the model in ``state(θ)`` for each θ (the
    mixture for several); the model's own θ is restored."""
    params = AdapterParameters.of(model)
    original = params.flat()
    parts, rates = [], []
    try:
        for theta in thetas:
            with state(theta):
                parts.append(response_predictions(model, tokenizer, [*forgotten, *nonmembers], params.flat(), max_length))
                if extract:
                    answers = greedy_answers(model, tokenizer, [e.prompt for e in forgotten])
                    rates.append(answer_rate(answers, [e.response for e in forgotten]))
    finally:
        params.assign(original)
    losses = mixture(parts).losses()
    n = len(forgotten)
    metrics = {f"loss_removed_{suffix}": float(losses[:n].mean()), f"mia_{suffix}": membership_auc(losses[:n], losses[n:])}
    if extract:
        metrics[f"extract_removed_{suffix}"] = float(np.max(rates))
    return metrics


def attack_metrics(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], forgotten: Sequence[Example], nonmembers: Sequence[Example],
    relearn: Sequence[Example], recipe: TrainConfig, *, bits: Sequence[int] = (8, 4), steps: int = 5,
    extract: bool = False,
) -> dict[str, float]:
    """Every attack's metrics for the adapter ``thetas`` (one θ, or an ensemble's members): ``_q<bits>`` for
    each of ``bits``, and ``_relearn`` when ``steps`` > 0 and ``relearn`` is not empty."""
    params = AdapterParameters.of(model)
    max_length = recipe.max_length

    def quantised(b: int) -> State:
        @contextlib.contextmanager
        def state(theta: Tensor) -> Iterator[None]:
            params.assign(theta)
            with quantised_merged(model, b):
                yield

        return state

    @contextlib.contextmanager
    def relearned(theta: Tensor) -> Iterator[None]:
        params.assign(theta)
        train_adapter(model, tokenizer, relearn, relearn_config(recipe, steps, len(relearn)))
        yield

    metrics: dict[str, float] = {}
    for b in bits:
        metrics.update(measure_forgetting(model, tokenizer, thetas, quantised(b), forgotten, nonmembers, max_length,
                                          extract, f"q{b}"))
    if steps > 0 and relearn:
        metrics.update(measure_forgetting(model, tokenizer, thetas, relearned, forgotten, nonmembers, max_length,
                                          extract, "relearn"))
    return metrics
