"""The methods LLMEraser is compared with (besides exact retraining, which is ``train.train_adapter``).

- Gradient Ascent (removal): from the trained adapter, maximise the mean loss of the removed examples
  (minimise −ℓ) with Adam for ``epochs`` passes over them; no term keeps the rest of the data in place.
- Continued fine-tuning (query modification, response correction): from the trained adapter, fine-tune on
  the corrected versions only, with the training recipe.
- SISA (exact, sharded): K adapters trained from the same initial θ on K disjoint shards of the training
  set; a request retrains only the shards that hold an affected example, on their edited shard. The
  ensemble predicts with the equal-weight mixture of the shard models' next-token distributions (and the
  mean of their Yes/No scores).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example, TokenizationConfig, collate, example_losses, tokenize_examples
from llmeraser.requests import EditPair, edited_training_set
from llmeraser.train import TrainConfig, TrainResult, train_adapter


def gradient_ascent(
    model: Any, tokenizer: Any, forget: Sequence[Example], recipe: TrainConfig, epochs: int = 1
) -> TrainResult:
    """Adam ascent on the mean loss of ``forget`` from the model's current θ (``recipe``'s lr, batch size,
    max length and seed); ``losses`` records the forget-set loss (nats per token) per step."""
    start = time.perf_counter()
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, forget, TokenizationConfig(recipe.max_length))
    optimizer = torch.optim.Adam(params.tensors, lr=recipe.lr)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(items), generator=generator).tolist()
            for begin in range(0, len(order), recipe.batch_size):
                batch = collate([items[i] for i in order[begin : begin + recipe.batch_size]], tokenizer.pad_token_id)
                loss = example_losses(model, batch).mean()
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for tensor in params.tensors:
            tensor.grad = None
    return TrainResult(losses, len(losses), time.perf_counter() - start)


def continued_finetuning(
    model: Any, tokenizer: Any, pairs: Sequence[EditPair], recipe: TrainConfig
) -> TrainResult:
    """Fine-tune from the model's current θ on the new versions of the edited examples (removals have
    none and are ignored) with ``recipe``."""
    corrected = [pair.new for pair in pairs if pair.new is not None]
    if not corrected:
        raise ValueError("continued fine-tuning needs at least one modified or corrected example")
    return train_adapter(model, tokenizer, corrected, recipe)


def shard_assignment(ids: Sequence[str], shards: int, seed: int = 0) -> dict[str, int]:
    """Example id → shard index in [0, shards): a seeded random permutation cut into near-equal parts."""
    if not 1 <= shards <= len(ids):
        raise ValueError(f"cannot cut {len(ids)} examples into {shards} shards")
    order = list(ids)
    random.Random(f"{seed}:sisa").shuffle(order)
    return {example_id: position * shards // len(order) for position, example_id in enumerate(order)}


@dataclass
class Sisa:
    """A SISA ensemble: ``thetas[k]`` is the adapter trained on shard k (None once a shard is empty);
    ``shard_of`` maps example ids to shards; ``train_time_s`` is the wall time of the last (re)training."""

    thetas: list[Tensor | None]
    shard_of: dict[str, int]
    train_time_s: float

    @property
    def members(self) -> list[Tensor]:
        """The adapters of the non-empty shards: the ensemble that predicts."""
        return [theta for theta in self.thetas if theta is not None]

    def shard(self, examples: Sequence[Example], k: int) -> list[Example]:
        """The examples of shard ``k``, in their order."""
        return [e for e in examples if self.shard_of[e.id] == k]

    def affected(self, pairs: Sequence[EditPair]) -> list[int]:
        """The shards holding at least one edited example, ascending."""
        return sorted({self.shard_of[pair.old.id] for pair in pairs})


def train_sisa(
    model: Any, tokenizer: Any, train: Sequence[Example], theta_init: Tensor, shards: int, recipe: TrainConfig,
    seed: int = 0,
) -> Sisa:
    """Train one adapter per shard from ``theta_init`` with ``recipe``; the model is left at ``theta_init``."""
    start = time.perf_counter()
    params = AdapterParameters.of(model)
    shard_of = shard_assignment([e.id for e in train], shards, seed)
    sisa = Sisa([], shard_of, 0.0)  # thetas filled below
    for k in range(shards):
        params.assign(theta_init)
        train_adapter(model, tokenizer, sisa.shard(train, k), recipe)
        sisa.thetas.append(params.flat())
    params.assign(theta_init)
    sisa.train_time_s = time.perf_counter() - start
    return sisa


def unlearn_sisa(
    model: Any,
    tokenizer: Any,
    sisa: Sisa,
    train: Sequence[Example],
    pairs: Sequence[EditPair],
    theta_init: Tensor,
    recipe: TrainConfig,
) -> Sisa:
    """The ensemble after the edits: the affected shards retrained from ``theta_init`` on their edited
    examples (a shard left empty keeps no model), the others unchanged. ``train_time_s`` is the retraining
    wall time; the model is left at ``theta_init``."""
    start = time.perf_counter()
    params = AdapterParameters.of(model)
    edited = edited_training_set(train, pairs)
    thetas = list(sisa.thetas)
    for k in sisa.affected(pairs):
        examples = sisa.shard(edited, k)
        if not examples:
            thetas[k] = None
            continue
        params.assign(theta_init)
        train_adapter(model, tokenizer, examples, recipe)
        thetas[k] = params.flat()
    params.assign(theta_init)
    return dataclasses.replace(sisa, thetas=thetas, train_time_s=time.perf_counter() - start)
