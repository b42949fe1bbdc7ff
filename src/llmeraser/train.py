"""LoRA fine-tuning with a seeded, reproducible recipe; also the exact "retrain" reference.

Objective (docs/method.md, "The influence update"): R(θ) = (1/N) Σ_i ℓ_i(θ) + (λ_wd/2)‖θ‖², ℓ_i the per-example mean response NLL.
The weight decay is an L2 term of the objective (not decoupled AdamW decay), so that the influence
update and the retrained model target the same minimiser.

Data-parallel under ``torchrun``: every rank takes its share (``llmeraser.distributed.shard``) of each
global mini-batch (Adam) or of the whole set (L-BFGS) and the loss sums and gradients are all-reduced, so
each step sees the same global objective as one process and every rank keeps the same θ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from llmeraser.adapter import AdapterParameters
from llmeraser.data import (
    Example,
    LossScope,
    TokenizationConfig,
    TokenizedExample,
    collate,
    example_losses,
    tokenize_examples,
)
from llmeraser.distributed import all_reduce_sum, is_distributed, shard
from llmeraser.errors import ConfigError
from llmeraser.options import option, validate

LBFGS_MAX_ITER = 100
"""torch.optim.LBFGS's ``max_iter`` per outer step (epoch) of ``optimizer="lbfgs"``: objective and gradient
evaluations at most, besides line-search ones (the erase planner and the dry run count them too)."""


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. ``optimizer="lbfgs"`` runs full-batch L-BFGS (``epochs`` outer steps): for small convex
    problems trained to convergence. ``lr`` is in units of the optimizer's step; ``lr_schedule="linear"``
    decays Adam's lr linearly to 0 over the run (a final iterate close to a minimum, as influence updates
    assume), ``"constant"`` keeps it. ``loss_scope``: which tokens carry the loss
    (``llmeraser.data.LOSS_SCOPES``: ``response``, ``assistant``, ``all``); recorded with the adapter, so that
    every later erase differentiates the loss it was trained on."""

    epochs: int = option(3, min=0, help="passes over the data")
    lr: float = option(1e-3, gt=0.0, help="Adam learning rate")
    batch_size: int = option(8, min=1, help="examples per optimisation step")
    weight_decay: float = option(0.0, min=0.0, help="λ_wd of the L2 term (λ_wd/2)‖θ‖²")
    seed: int = option(0, help="seed of adapter initialisation and example order")
    max_length: int = option(256, min=2, help="max tokens per example (prompt cut from the left)")
    optimizer: Literal["adam", "lbfgs"] = option(
        "adam", open_choices=True, help="adam: mini-batches of `batch_size`; lbfgs: full-batch L-BFGS, `epochs` outer steps")
    lr_schedule: Literal["constant", "linear"] = option(
        "constant", open_choices=True,
        help="Adam's lr: constant, or decayed linearly to 0 over the run (a final adapter closer to a minimum)")
    loss_scope: LossScope = option(
        "response", help="tokens that carry the loss: response (the response / last assistant turn / completion), "
        "assistant (every assistant turn), all (every token)")

    def __post_init__(self) -> None:
        validate(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """Loss history (objective per step) and wall time in seconds."""

    losses: list[float]
    steps: int
    wall_time_s: float


def l2_penalty(params: AdapterParameters, weight_decay: float) -> torch.Tensor:
    """(λ_wd/2)‖θ‖² on the live tensors (differentiable)."""
    if not weight_decay:
        return torch.zeros((), dtype=params.tensors[0].dtype)
    zero = torch.zeros((), dtype=params.tensors[0].dtype, device=params.tensors[0].device)
    return 0.5 * weight_decay * sum(((t * t).sum() for t in params.tensors), zero)


Schedule = list[list[int]]
"""The mini-batches of an Adam run in step order: each a list of indices into the training examples (an
empty list is a step with no example left: the optimiser skips it, the learning-rate schedule advances)."""


def batch_schedule(n_examples: int, config: TrainConfig) -> Schedule:
    """The mini-batches ``train_adapter`` runs on ``n_examples`` examples: per epoch a permutation drawn from
    ``config.seed`` (one generator over the whole run), cut into batches of ``config.batch_size``."""
    generator = torch.Generator().manual_seed(config.seed)
    schedule: Schedule = []
    for _ in range(config.epochs):
        order = torch.randperm(n_examples, generator=generator).tolist()
        schedule += [order[begin : begin + config.batch_size] for begin in range(0, n_examples, config.batch_size)]
    return schedule


def paired_schedule(original_ids: Sequence[str], edited_ids: Sequence[str], config: TrainConfig) -> Schedule:
    """The retrain's mini-batches paired with the original run's: the original's ``batch_schedule`` over
    ``original_ids`` with every removed example dropped in place and every edited one (same id, new text)
    substituted in place, as indices into ``edited_ids``. Each surviving example keeps its step and its
    batch mates, and every step keeps its learning rate, so the two runs differ only by the edit (the
    retrain of "the same seed" otherwise draws a different permutation over fewer examples)."""
    where = {example_id: k for k, example_id in enumerate(edited_ids)}
    unknown = sorted(set(where) - set(original_ids))
    if unknown:
        raise ValueError(f"paired retraining: edited example id(s) not in the original training set: {unknown[:5]}")
    return [[where[original_ids[i]] for i in batch if original_ids[i] in where]
            for batch in batch_schedule(len(original_ids), config)]


def train_adapter(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    progress: bool = False,
    schedule: Schedule | None = None,
) -> TrainResult:
    """Fit θ (the model's trainable tensors) on ``examples``. Adam runs ``schedule`` (default
    ``batch_schedule(len(examples), config)``: the example order per epoch comes from ``seed``); a paired
    retrain passes ``paired_schedule``. Each step's loss is the mean over the examples of its batch."""
    start = time.perf_counter()
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(config.max_length, loss_scope=config.loss_scope))
    pad = tokenizer.pad_token_id
    losses: list[float] = []
    was_training = model.training
    parallel = is_distributed()
    model.eval()  # dropout off: the trained objective is the one the eraser differentiates
    try:
        if config.optimizer == "lbfgs":
            _train_lbfgs(model, params, items, pad, config, losses, parallel)
        elif config.optimizer == "adam":
            batches = batch_schedule(len(items), config) if schedule is None else schedule
            optimizer = torch.optim.Adam(params.tensors, lr=config.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.lr_schedule, len(batches)))
            bar = tqdm(total=len(batches), desc="train", disable=not progress, leave=False)
            for batch in batches:
                if batch:  # a batch whose every example was removed: no step, the lr schedule still advances
                    chosen = [items[i] for i in batch]
                    local = shard(chosen) if parallel else chosen
                    objective = objective_and_gradient(model, params, local, pad, config, len(chosen), parallel)
                    optimizer.step()
                    losses.append(float(objective))
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                scheduler.step()
                bar.update(1)
            bar.close()
        else:
            raise ConfigError("optimizer", f"unknown optimizer {config.optimizer!r} (expected 'adam' or 'lbfgs')")
    finally:
        model.train(was_training)
        for tensor in params.tensors:
            tensor.grad = None
    return TrainResult(losses, len(losses), time.perf_counter() - start)


def lr_multiplier(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The factor of the base lr at step t (0-based): 1 for ``constant``; (T − t)/T for ``linear``, so the
    last of T steps uses lr/T."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "linear":
        return lambda step: max(total_steps - step, 0) / max(total_steps, 1)
    raise ConfigError("lr_schedule", f"unknown lr_schedule {schedule!r} (expected 'constant' or 'linear')")


def objective_and_gradient(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad: int,
    config: TrainConfig,
    count: int,
    distributed: bool = False,
) -> torch.Tensor:
    """R(θ) = (1/count) Σ_items ℓ_i + (λ_wd/2)‖θ‖² (detached); its gradient is written to the θ tensors' ``.grad``.

    Forward/backward in batches of ``config.batch_size``. ``distributed``: ``items`` are this rank's share of
    the ``count`` examples; the loss sum and its gradient are all-reduced, so every rank gets the global R.
    """
    grads = [torch.zeros_like(t) for t in params.tensors]
    data = torch.zeros((), dtype=params.tensors[0].dtype)
    for begin in range(0, len(items), config.batch_size):
        loss = example_losses(model, collate(items[begin : begin + config.batch_size], pad)).sum() / count
        for total, piece in zip(grads, torch.autograd.grad(loss, params.tensors, allow_unused=True)):
            if piece is not None:
                total += piece
        data += loss.detach().to(data.dtype)
    if distributed:
        grads = params.split(all_reduce_sum(params.flatten(grads)))
        all_reduce_sum(data)
    penalty = l2_penalty(params, config.weight_decay)
    if config.weight_decay:
        for total, piece in zip(grads, torch.autograd.grad(penalty, params.tensors)):
            total += piece
    for tensor, grad in zip(params.tensors, grads):
        tensor.grad = grad
    return data + penalty.detach()


def _train_lbfgs(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad: int,
    config: TrainConfig,
    losses: list[float],
    distributed: bool = False,
) -> None:
    optimizer = torch.optim.LBFGS(
        params.tensors,
        lr=config.lr,
        max_iter=LBFGS_MAX_ITER,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    local = shard(items) if distributed else items

    def closure() -> torch.Tensor:
        return objective_and_gradient(model, params, local, pad, config, len(items), distributed)

    for _ in range(config.epochs):
        losses.append(float(optimizer.step(closure)))
