"""The quantisation check: does rounding the merged model's weights bring forgotten data back?

Unlearning by small weight changes can be undone by quantisation: 4-bit round-to-nearest of models unlearned by
gradient-based methods restored most of the forgotten knowledge in arXiv 2410.16454. The check, per adapter θ:

- merge: for each module the adapter adapts, W_merged = W + ΔW(θ) (PEFT's ``get_delta_weight``: scale · B A);
  modules without LoRA are left as they are (in full precision);
- round each merged matrix per output channel (row), symmetric round-to-nearest at ``bits`` bits:
  scale_r = max_j |W_rj| / (2^(bits−1) − 1), Q_rj = scale_r · clamp(round(W_rj / scale_r), −q, q),
  q = 2^(bits−1) − 1 (a row of zeros stays zero);
- evaluate the model with the rounded merged weights and the adapter switched off; then restore every base
  weight bit-exactly (the saved tensors are copied back) and the adapter as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import adapter_disabled


def quantise_rows(weight: Tensor, bits: int) -> Tensor:
    """Symmetric per-output-channel round-to-nearest of a 2-D ``weight`` at ``bits`` bits (module docstring),
    returned dequantised in ``weight``'s dtype (computed in float64)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if bits < 2:
        raise ValueError(f"bits must be at least 2 (a sign and one level), got {bits}")
    levels = 2 ** (bits - 1) - 1
    w = weight.double()
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / safe), -levels, levels) * safe
    return torch.where(scale > 0, q, torch.zeros_like(q)).to(weight.dtype)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every PEFT LoRA layer of ``model`` (the adapted modules)."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@torch.no_grad()
def merged_weight(layer: Any) -> Tensor:
    """W + ΔW of one LoRA layer for its active adapter(s), in the base weight's dtype."""
    weight = layer.get_base_layer().weight
    merged = weight.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged += layer.get_delta_weight(adapter).to(weight.dtype)
    return merged


@contextlib.contextmanager
def quantised_merged(model: Any, bits: int | None) -> Iterator[Any]:
    """While active, ``model`` (a PEFT model) computes with each adapted module's merged weight rounded at
    ``bits`` bits (``bits=None``: merged, not rounded) and its adapter switched off; on exit every base weight
    is restored bit-exactly and the adapter switched back on; each parameter's ``requires_grad`` stays as it was,
    inside too. Changing θ inside has no effect on the outputs (the merge is taken on entry)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    saved = [(layer.get_base_layer().weight, layer.get_base_layer().weight.detach().clone()) for _, layer in layers]
    try:
        with torch.no_grad():
            for (_, layer), (weight, _) in zip(layers, saved):
                merged = merged_weight(layer)
                weight.copy_(merged if bits is None else quantise_rows(merged, bits))
        with adapter_disabled(model):
            yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
