"""Kronecker-factored curvature (K-FAC) of the LoRA parameters, fitted once and reused.

For every LoRA linear layer (``lora_A`` and ``lora_B`` of each adapted module) with weight W (out × in),
the Gauss–Newton block of W is approximated as G ⊗ A ("K-FAC reduce", Eschenhagen et al. 2023: the
weight is shared across the token positions of a sequence whose loss is one number per example):

    A = (1/N) Σ_i ā_i ā_iᵀ,  ā_i = mean_s a_is   (in × in)   a: the layer's input at token s of example i
    G = (1/N) Σ_i δ̄_i δ̄_iᵀ,  δ̄_i = Σ_s δ_is      (out × out) δ: gradient of the sampled loss w.r.t. the output

over the N examples and their non-padding positions s (so that δ̄_i ā_iᵀ approximates the example's
weight gradient Σ_s δ_is a_isᵀ). LoRA on the output projection (``lm_head``) uses "K-FAC expand" instead,
A = (1/M) Σ a aᵀ and G = (1/N) Σ δ δᵀ over the M positions that carry a loss, exact there up to the
Kronecker factorisation because each position's logits depend on its own input only. The sampled loss is Σ_i Σ_t √(w_it) ·
(−log p(ỹ_it)) with ỹ drawn from the model's own next-token distribution at the response positions and
w_it = 1/T_i the per-example mean weights, so that E[δ δᵀ] carries the Gauss–Newton (Fisher) curvature
of the training objective; cross-layer blocks are dropped. The damped inverse
(G ⊗ A + λI)⁻¹ vec(V) = Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ uses the eigendecompositions of G and A.

Stored as ``kfac.safetensors`` (eigenvectors and eigenvalues per layer) + ``curvature.json`` (the hashes
of base model, adapter and data it was fitted on, and its settings), and refused on a mismatch.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.data import TokenizedExample, aligned_labels, forward_logits, iter_batches, shifted_targets
from llmeraser.errors import InputError
from llmeraser.model import AdapterParameters, atomic_directory

CURVATURE_FILE = "kfac.safetensors"
CURVATURE_META = "curvature.json"
MAX_FACTOR_DIM = 8192


@dataclass
class KroneckerFactors:
    """Eigendecompositions of A (in × in) and G (out × out) for one LoRA weight (out × in)."""

    a_vectors: Tensor
    a_values: Tensor
    g_vectors: Tensor
    g_values: Tensor

    def inverse_product(self, matrix: Tensor, shift: float) -> Tensor:
        """(G ⊗ A + shift·I)⁻¹ applied to a weight-shaped (out × in) matrix."""
        rotated = self.g_vectors.T @ matrix @ self.a_vectors
        rotated = rotated / (torch.outer(self.g_values, self.a_values) + shift)
        return self.g_vectors @ rotated @ self.a_vectors.T

    def product(self, matrix: Tensor) -> Tensor:
        """(G ⊗ A) applied to a weight-shaped matrix: G V A."""
        g = (self.g_vectors * self.g_values) @ self.g_vectors.T
        a = (self.a_vectors * self.a_values) @ self.a_vectors.T
        return g @ matrix @ a


def lora_layers(model: torch.nn.Module, params: AdapterParameters) -> dict[str, torch.nn.Linear]:
    """The LoRA linear layers whose weights are in θ, by θ parameter name (``....lora_A.default.weight``)."""
    modules = dict(model.named_modules())
    layers = {}
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    head_names = {n for n, m in base.named_modules() if m is head or getattr(m, "base_layer", None) is head}
    return {name for name in params.names if any(f"{h}.lora_" in name for h in head_names)}


def _suffix(mask: Tensor, length: int) -> Tensor:
    """The last ``length`` positions of a (B, L, 1) mask: layers after ``logits_to_keep`` see a suffix."""
    return mask[:, mask.shape[1] - length :]


def fit_kfac(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, KroneckerFactors]:
    """Fit the K-FAC factors of every LoRA weight in θ over ``items`` (one pass, one label sample each)."""
    layers = lora_layers(model, params)
    too_large = [n for n, m in layers.items() if max(m.in_features, m.out_features) > MAX_FACTOR_DIM]
    if too_large:
        raise InputError(
            f"K-FAC factors are limited to {MAX_FACTOR_DIM} rows; '{too_large[0]}' is "
            f"{layers[too_large[0]].out_features}×{layers[too_large[0]].in_features} (a LoRA on the vocabulary "
            "projection?): use the exact curvature operator instead of a curvature cache"
        )
    sums_a = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    sums_g = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for name, m in layers.items()}
    state: dict[str, Tensor] = {}
    handles = []

    expand = output_layer_names(model, params)

    def forward_hook(name: str):
        def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            a = inputs[0].detach().to(torch.float64)
            if name in expand:  # per position: only the positions that carry a loss
                a = a * state["loss_mask"]
                sums_a[name] += torch.einsum("bsi,bsj->ij", a, a)
            else:
                mask = _suffix(state["mask"], a.shape[1])
                mean_a = (a * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
                sums_a[name] += mean_a.T @ mean_a
        return hook

    def backward_hook(name: str):
        def hook(module: torch.nn.Module, grad_input: tuple, grad_output: tuple[Tensor, ...]) -> None:
            delta = grad_output[0].detach().to(torch.float64)
            if name in expand:
                delta = delta * state["loss_mask"]
                sums_g[name] += torch.einsum("bsi,bsj->ij", delta, delta)
            else:
                summed = (delta * _suffix(state["mask"], delta.shape[1])).sum(dim=1)
                sums_g[name] += summed.T @ summed
        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
        handles.append(module.register_full_backward_hook(backward_hook(name)))
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
    generator = torch.Generator().manual_seed(seed)
    loss_positions = 0
    try:
        for batch in iter_batches(items, batch_size, pad_token_id):
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
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(weights.shape)
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="none"
                ).view(weights.shape)
                loss = (nll * weights.sqrt().to(nll.dtype)).sum()
                torch.autograd.grad(loss, params.tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for name in layers:
        a = sums_a[name] / (loss_positions if name in expand else len(items))
        g = sums_g[name] / len(items)
        a_values, a_vectors = torch.linalg.eigh(0.5 * (a + a.T))
        g_values, g_vectors = torch.linalg.eigh(0.5 * (g + g.T))
        factors[name] = KroneckerFactors(a_vectors, a_values.clamp_min(0), g_vectors, g_values.clamp_min(0))
    return factors


@dataclass
class KfacInverse:
    """v ↦ (K + shift·I)⁻¹ v for a flat θ-shaped vector, K the block-diagonal K-FAC curvature."""

    factors: dict[str, KroneckerFactors]
    params: AdapterParameters
    shift: float

    def __call__(self, vector: Tensor) -> Tensor:
        pieces = self.params.split(vector)
        solved = []
        for name, piece in zip(self.params.names, pieces):
            factor = self.factors[name]
            result = factor.inverse_product(piece.to(torch.float64), self.shift)
            solved.append(result.to(vector.dtype))
        return self.params.flatten(solved)


def save_kfac(
    factors: dict[str, KroneckerFactors], out_dir: str | Path, metadata: dict[str, Any]
) -> Path:
    """Write ``kfac.safetensors`` + ``curvature.json`` to a new directory (atomically, ``atomic_directory``)."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        tensors = {}
        for name, factor in factors.items():
            for field in ("a_vectors", "a_values", "g_vectors", "g_values"):
                tensors[f"{name}::{field}"] = getattr(factor, field).contiguous()
        save_file(tensors, str(tmp / CURVATURE_FILE))
        (tmp / CURVATURE_META).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def load_kfac(curvature_dir: str | Path, expected: dict[str, str]) -> tuple[dict[str, KroneckerFactors], dict[str, Any]]:
    """Read a fitted curvature; raise ``InputError`` if any ``expected`` hash differs from the stored one."""
    from safetensors.torch import load_file

    curvature_dir = Path(curvature_dir)
    meta_path = curvature_dir / CURVATURE_META
    if not meta_path.is_file() or not (curvature_dir / CURVATURE_FILE).is_file():
        raise InputError(f"not a curvature directory (needs {CURVATURE_META} and {CURVATURE_FILE})", curvature_dir)
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise InputError(
                f"the curvature was fitted for a different {key.removesuffix('_sha256').replace('_', ' ')} "
                f"(stored {str(metadata.get(key))[:12]}…, given {value[:12]}…); fit it again with fit-curvature",
                curvature_dir,
            )
    tensors = load_file(str(curvature_dir / CURVATURE_FILE))
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, field = key.split("::")
        factors.setdefault(name, {})[field] = tensor
    return {name: KroneckerFactors(**fields) for name, fields in factors.items()}, metadata


def fit_and_time(
    model: Any, params: AdapterParameters, items: Sequence[TokenizedExample], pad_token_id: int, batch_size: int, seed: int
) -> tuple[dict[str, KroneckerFactors], float]:
    """``fit_kfac`` and its wall time in seconds."""
    start = time.perf_counter()
    factors = fit_kfac(model, params, items, pad_token_id, batch_size, seed)
    return factors, time.perf_counter() - start
