"""The LoRA layers a cached curvature is fitted on, and the sampled forward/backward passes over them that
K-FAC and EK-FAC share.

The sampled loss is Σ_i Σ_t √(w_it) · (−log p(ỹ_it)) with ỹ drawn from the model's own next-token
distribution at the response positions and w_it = 1/T_i the per-example mean weights, so that E[δ δᵀ]
(δ: the gradient of the sampled loss w.r.t. a layer's output) carries the Gauss–Newton (Fisher) curvature of
the training objective. The labels of each batch are drawn from a generator seeded per batch, so that they,
hence the factors, do not depend on the number of processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import TokenizedExample, aligned_labels, collate, forward_logits, shifted_targets
from llmeraser.distributed import all_reduce_sum, shard
from llmeraser.errors import InputError

MAX_FACTOR_DIM = 8192


def lora_layers(model: torch.nn.Module, params: AdapterParameters) -> dict[str, torch.nn.Linear]:
    """The LoRA linear layers whose weights are in θ, by θ parameter name (``....lora_A.default.weight``)."""
    modules = dict(model.named_modules())
    layers: dict[str, torch.nn.Linear] = {}
    for name in params.names:
        module = modules.get(name.removesuffix(".weight"))
        if not name.endswith(".weight") or not isinstance(module, torch.nn.Linear) or module.bias is not None:
            raise InputError(
                f"K-FAC supports LoRA linear weights only; θ contains '{name}' (use --curvature gauss-newton)"
            )
        layers[name] = module
    return layers


def output_layer_names(model: torch.nn.Module, params: AdapterParameters) -> set[str]:
    """θ names of LoRA layers on the output projection (``lm_head``): each position's logits depend on
    that position's input only, so these use "K-FAC expand" over the positions that carry a loss."""
    peft: Any = model
    base: Any = peft.get_base_model() if hasattr(peft, "get_base_model") else peft
    head = base.get_output_embeddings()
    head_names = {n for n, m in base.named_modules() if m is head or getattr(m, "base_layer", None) is head}
    return {name for name in params.names if any(f"{h}.lora_" in name for h in head_names)}


def suffix(mask: Tensor, length: int) -> Tensor:
    """The last ``length`` positions of a (B, L, 1) mask: layers after ``logits_to_keep`` see a suffix."""
    return mask[:, mask.shape[1] - length :]


def check_factor_sizes(layers: dict[str, torch.nn.Linear]) -> None:
    """Refuse layers whose Kronecker factors would exceed ``MAX_FACTOR_DIM`` rows."""
    too_large = [n for n, m in layers.items() if max(m.in_features, m.out_features) > MAX_FACTOR_DIM]
    if too_large:
        raise InputError(
            f"K-FAC factors are limited to {MAX_FACTOR_DIM} rows; '{too_large[0]}' is "
            f"{layers[too_large[0]].out_features}×{layers[too_large[0]].in_features} (a LoRA on the vocabulary "
            "projection?): use the exact curvature operator instead of a curvature cache"
        )


LayerCallback = Callable[[str, Tensor, dict[str, Tensor]], None]


def sampled_passes(
    model: Any,
    layers: dict[str, torch.nn.Linear],
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int,
    seed: int,
    on_input: LayerCallback,
    on_output_grad: LayerCallback,
    distributed: bool = False,
) -> int:
    """One forward/backward of the sampled loss (module docstring) per batch of ``items``.

    Calls ``on_input(name, a, state)`` with each LoRA layer's input a (B, S, in) and ``on_output_grad(name,
    δ, state)`` with the gradient δ (B, S, out) of the sampled loss w.r.t. its output, both float64;
    ``state`` holds the batch's ``mask`` (B, L, 1: non-padding) and ``loss_mask`` (B, S_logits, 1: logits
    positions that carry a loss). The same ``seed`` draws the same labels. Returns the number of loss positions.
    ``distributed``: only this rank's batches (``sampling_batches``); the caller all-reduces its sums.
    """
    state: dict[str, Tensor] = {}
    handles = []

    def forward_hook(name: str) -> Callable[[torch.nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            on_input(name, inputs[0].detach().to(torch.float64), state)
        return hook

    def backward_hook(name: str) -> Callable[[torch.nn.Module, Any, tuple[Tensor, ...]], None]:
        def hook(module: torch.nn.Module, grad_input: Any, grad_output: tuple[Tensor, ...]) -> None:
            on_output_grad(name, grad_output[0].detach().to(torch.float64), state)
        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
        handles.append(module.register_full_backward_hook(backward_hook(name)))
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
    )
    loss_positions = 0
    try:
        for batch, generator in sampling_batches(items, batch_size, pad_token_id, seed, distributed):
            state["mask"] = batch["attention_mask"].to(torch.float64).unsqueeze(-1)
            _, loss_weights = shifted_targets(aligned_labels(batch, model))
            has_loss = torch.nn.functional.pad((loss_weights > 0).to(torch.float64), (0, 1))  # logits positions
            state["loss_mask"] = has_loss.unsqueeze(-1)
            loss_positions += int(has_loss.sum())
            with torch.enable_grad():
                logits, labels = forward_logits(model, batch)
                _, weights = shifted_targets(labels)
                logits = logits[:, :-1]
                probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
                flat = probs.reshape(-1, probs.shape[-1])
                sampled = torch.multinomial(flat, 1, generator=generator).view(weights.shape)
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="none"
                ).view(weights.shape)
                loss = (nll * weights.sqrt().to(nll.dtype)).sum()
                torch.autograd.grad(loss, params.tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return loss_positions


# --- data parallelism: the batches a rank fits on, and the reduction of its sums -----------------------


def sampling_batches(
    items: Sequence[TokenizedExample], batch_size: int, pad_token_id: int, seed: int, distributed: bool
) -> Iterator[tuple[dict[str, Tensor], torch.Generator]]:
    """This rank's batches (every ``world_size``-th one when ``distributed``), each with its own generator
    for the sampled labels, seeded per batch from ``seed``: the labels drawn, hence the factors, do not
    depend on the number of processes."""
    starts = list(range(0, len(items), batch_size))
    seeds = torch.randint(2**62, (len(starts),), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = list(zip(starts, seeds))
    for start, batch_seed in shard(batches) if distributed else batches:
        yield collate(items[start : start + batch_size], pad_token_id), torch.Generator().manual_seed(batch_seed)


def all_reduce_sums(sums: Sequence[Tensor], count: int) -> int:
    """Sum ``sums`` (in place) and ``count`` over ranks; returns the summed count."""
    for tensor in sums:
        all_reduce_sum(tensor)
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.long)).item())
