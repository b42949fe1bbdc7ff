"""Gradients of the per-example loss in θ, and the right-hand side b of the influence system.

Sign convention (docs/method.md, "The influence update"): for an edit set S that replaces z_i by z'_i (z'_i = ∅ for a removal,
whose gradient is 0),

    b = c · Σ_{i∈S} [∇ℓ(z_i; θ̂) − ∇ℓ(z'_i; θ̂)]  +  (k / m) λ_wd θ̂   (the last term only for ``scaling="retrain"``)

with c = 1/m, m = n − k (k removals) for ``scaling="retrain"`` — the Newton step towards the minimiser
of the retraining objective (1/m) Σ_{j∉S} ℓ_j + (λ_wd/2)‖θ‖² — or c = 1/n for ``scaling="paper"``, the
classical first-order influence estimate. Then θ_new = θ̂ + (H + λI)⁻¹ b.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import (
    TokenizedExample,
    aligned_labels,
    example_losses,
    iter_batches,
    model_inputs,
    response_nll,
)
from llmeraser.distributed import all_reduce_sum
from llmeraser.errors import ConfigError

Scaling = Literal["retrain", "paper"]


def summed_gradient(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    signs: Sequence[float] | None = None,
) -> Tensor:
    """Σ_i s_i ∇ℓ_i(θ) over ``items`` (s_i = ``signs[i]``, default 1), shape (p,). Eval mode: no dropout.

    Right padding leaves each example's loss unchanged, so a batch's summed loss gives the summed gradient.
    """
    total = torch.zeros(params.dim, dtype=params.tensors[0].dtype)
    weights = torch.ones(len(items), dtype=total.dtype) if signs is None else torch.as_tensor(signs, dtype=total.dtype)
    for start, batch in zip(range(0, len(items), batch_size), iter_batches(items, batch_size, pad_token_id)):
        with torch.enable_grad():
            losses = example_losses(model, batch)
            weighted = (losses.to(total.dtype) * weights[start : start + len(losses)]).sum()
            grads = torch.autograd.grad(weighted, params.tensors, allow_unused=True)
        total += params.flatten([torch.zeros_like(t) if g is None else g for g, t in zip(grads, params.tensors)])
    return total


def per_example_gradients(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    chunk_size: int = 8,
) -> Tensor:
    """∇ℓ_i(θ) of every example, shape (n, p) in the flat order of ``params``; eval mode (no dropout).

    ``torch.func``: ``vmap`` over ``grad`` of the one-example loss under ``functional_call``, on chunks of
    ``chunk_size`` right-padded examples (memory ~ one batch's activations and chunk_size × p gradients).
    Each example is its own batch of one inside ``vmap``, so right padding leaves its loss unchanged.
    """
    from torch.func import functional_call, grad, vmap

    primals = {name: t.detach() for name, t in zip(params.names, params.tensors)}
    rows = []
    for batch in iter_batches(items, chunk_size, pad_token_id):
        inputs = model_inputs(batch, model)
        labels = aligned_labels(batch, model)
        fixed = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}

        def loss(theta: dict[str, Tensor], ids: Tensor, mask: Tensor, target: Tensor) -> Tensor:
            kwargs = {"input_ids": ids[None], "attention_mask": mask[None], **fixed}  # noqa: B023 (called in this iteration only)
            logits = functional_call(model, theta, args=(), kwargs=kwargs, strict=False).logits
            return response_nll(logits, target[None])[0]

        with torch.enable_grad():
            grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(
                primals, inputs["input_ids"], inputs["attention_mask"], labels
            )
        rows.append(torch.cat([grads[name].reshape(len(labels), -1) for name in params.names], dim=1))
    if not rows:
        return torch.zeros(0, params.dim, dtype=params.tensors[0].dtype)
    return torch.cat(rows)


def influence_rhs(
    model: Any,
    params: AdapterParameters,
    old_items: Sequence[TokenizedExample],
    new_items: Sequence[TokenizedExample],
    n_train: int,
    pad_token_id: int,
    weight_decay: float = 0.0,
    scaling: Scaling = "retrain",
    batch_size: int = 8,
    removed: int | None = None,
    distributed: bool = False,
) -> Tensor:
    """b of the module docstring, shape (p,).

    ``old_items``: the edited examples as they are in the training set (all k_total of them);
    ``new_items``: their replacements (modified queries / corrected responses only; removals have none).
    ``n_train``: the size n of the training set the adapter was trained on.
    ``removed``: the number k of removals (default: ``len(old_items) − len(new_items)``).
    ``distributed``: the items are this rank's shard; the gradient sums are all-reduced over ranks.
    """
    if removed is None:
        removed = len(old_items) - len(new_items)
    if scaling == "retrain":
        scale = 1.0 / (n_train - removed)
    elif scaling == "paper":
        scale = 1.0 / n_train
    else:
        raise ConfigError("scaling", f"unknown scaling {scaling!r} (expected 'retrain' or 'paper')")
    items = list(old_items) + list(new_items)
    signs = [1.0] * len(old_items) + [-1.0] * len(new_items)
    total = summed_gradient(model, params, items, pad_token_id, batch_size, signs)
    b = scale * (all_reduce_sum(total) if distributed else total)
    if scaling == "retrain" and removed and weight_decay:
        b += (removed / (n_train - removed)) * weight_decay * params.flat()
    return b
