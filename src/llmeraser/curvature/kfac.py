"""Kronecker-factored curvature (K-FAC) of the LoRA parameters, fitted once and reused.

For every LoRA linear layer (``lora_A`` and ``lora_B`` of each adapted module) with weight W (out × in),
the Gauss–Newton block of W is approximated as G ⊗ A ("K-FAC reduce", Eschenhagen et al. 2023: the
weight is shared across the token positions of a sequence whose loss is one number per example):

    A = (1/N) Σ_i ā_i ā_iᵀ,  ā_i = mean_s a_is   (in × in)   a: the layer's input at token s of example i
    G = (1/N) Σ_i δ̄_i δ̄_iᵀ,  δ̄_i = Σ_s δ_is      (out × out) δ: gradient of the sampled loss w.r.t. the output

over the N examples and their non-padding positions s (so that δ̄_i ā_iᵀ approximates the example's
weight gradient Σ_s δ_is a_isᵀ). LoRA on the output projection (``lm_head``) uses "K-FAC expand" instead,
A = (1/M) Σ a aᵀ and G = (1/N) Σ δ δᵀ over the M positions that carry a loss, exact there up to the
Kronecker factorisation because each position's logits depend on its own input only. The sampled loss
(``llmeraser.curvature.hooks``) draws its labels from the model's own next-token distribution, so that
E[δ δᵀ] carries the Gauss–Newton (Fisher) curvature of the training objective; cross-layer blocks are
dropped. The damped inverse (G ⊗ A + λI)⁻¹ vec(V) = Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ uses the
eigendecompositions of G and A.

Stored as ``kfac.safetensors`` (eigenvectors and eigenvalues per layer; EK-FAC, ``llmeraser.curvature.ekfac``,
adds its refitted eigenvalues to the same file) beside ``curvature.json`` (``llmeraser.curvature.cache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.hooks import (
    all_reduce_sums,
    check_factor_sizes,
    lora_layers,
    output_layer_names,
    sampled_passes,
    suffix,
)
from llmeraser.curvature.registry import (
    CurvatureMethod,
    FitEstimate,
    FitProbe,
    fit_function,
    register_curvature_method,
)
from llmeraser.data import TokenizedExample

KFAC_FILE = "kfac.safetensors"


@dataclass
class KroneckerFactors:
    """Eigendecompositions of A (in × in) and G (out × out) for one LoRA weight (out × in). With
    ``corrected`` Λ (out × in; EK-FAC) the eigenvalues λ_G λ_Aᵀ of G ⊗ A are replaced by Λ, so that
    K vec(V) = vec(Q_G [Λ ⊙ (Q_Gᵀ V Q_A)] Q_Aᵀ)."""

    a_vectors: Tensor
    a_values: Tensor
    g_vectors: Tensor
    g_values: Tensor
    corrected: Tensor | None = None

    @property
    def method(self) -> str:
        return "kfac" if self.corrected is None else "ekfac"

    def eigenvalues(self) -> Tensor:
        """The curvature's eigenvalues in the Kronecker eigenbasis, (out × in): λ_G λ_Aᵀ, or Λ for EK-FAC."""
        return torch.outer(self.g_values, self.a_values) if self.corrected is None else self.corrected

    def inverse_product(self, matrix: Tensor, shift: float) -> Tensor:
        """(K + shift·I)⁻¹ applied to a weight-shaped (out × in) matrix, K = G ⊗ A (or its EK-FAC form)."""
        rotated = self.g_vectors.T @ matrix @ self.a_vectors
        rotated = rotated / (self.eigenvalues() + shift)
        return self.g_vectors @ rotated @ self.a_vectors.T

    def product(self, matrix: Tensor) -> Tensor:
        """K applied to a weight-shaped matrix: G V A for K-FAC (its EK-FAC form when ``corrected``)."""
        rotated = self.g_vectors.T @ matrix @ self.a_vectors
        return self.g_vectors @ (rotated * self.eigenvalues()) @ self.a_vectors.T


def fit_kfac(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> dict[str, KroneckerFactors]:
    """Fit the K-FAC factors of every LoRA weight in θ over ``items`` (one pass, one label sample each).

    ``distributed``: ``items`` are all examples; this rank fits on its share of the batches and the factor
    sums and counts are all-reduced, with the same result as one process.
    """
    sums_a, sums_g, loss_positions = kfac_sums(model, params, items, pad_token_id, batch_size, seed, distributed)
    if distributed:
        loss_positions = all_reduce_sums([*sums_a.values(), *sums_g.values()], loss_positions)
    return kfac_factors(model, params, sums_a, sums_g, len(items), loss_positions)


def kfac_sums(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """The sampled pass of ``fit_kfac``: the unnormalised factor sums (Σ ā āᵀ, Σ δ̄ δ̄ᵀ) of every LoRA
    layer over this process's batches of ``items``, and the number of loss positions."""
    layers = lora_layers(model, params)
    check_factor_sizes(layers)
    sums_a = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    sums_g = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for name, m in layers.items()}
    expand = output_layer_names(model, params)

    def on_input(name: str, a: Tensor, state: dict[str, Tensor]) -> None:
        if name in expand:  # per position: only the positions that carry a loss
            a = a * state["loss_mask"]
            sums_a[name] += torch.einsum("bsi,bsj->ij", a, a)
        else:
            mask = suffix(state["mask"], a.shape[1])
            mean_a = (a * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
            sums_a[name] += mean_a.T @ mean_a

    def on_output_grad(name: str, delta: Tensor, state: dict[str, Tensor]) -> None:
        if name in expand:
            delta = delta * state["loss_mask"]
            sums_g[name] += torch.einsum("bsi,bsj->ij", delta, delta)
        else:
            summed = (delta * suffix(state["mask"], delta.shape[1])).sum(dim=1)
            sums_g[name] += summed.T @ summed

    loss_positions = sampled_passes(
        model, layers, params, items, pad_token_id, batch_size, seed, on_input, on_output_grad, distributed
    )
    return sums_a, sums_g, loss_positions


def kfac_factors(
    model: Any,
    params: AdapterParameters,
    sums_a: dict[str, Tensor],
    sums_g: dict[str, Tensor],
    n_items: int,
    loss_positions: int,
) -> dict[str, KroneckerFactors]:
    """The K-FAC factors from ``kfac_sums`` over ``n_items`` examples: the eigendecompositions of A and G."""
    expand = output_layer_names(model, params)
    factors = {}
    for name in sums_a:
        a = sums_a[name] / (loss_positions if name in expand else n_items)
        g = sums_g[name] / n_items
        a_values, a_vectors = torch.linalg.eigh(0.5 * (a + a.T))
        g_values, g_vectors = torch.linalg.eigh(0.5 * (g + g.T))
        factors[name] = KroneckerFactors(a_vectors, a_values.clamp_min(0), g_vectors, g_values.clamp_min(0))
    return factors


def estimate_kfac_fit(probe: FitProbe) -> FitEstimate:
    """The dry run's K-FAC fit: one sampled forward + backward per batch (``kfac_sums``) + the
    eigendecompositions of the factors (timed once on the probe's factors: their sizes do not depend on the
    data)."""
    factors, seconds, probes = estimate_kfac_factors(probe)
    how = (f"1 sampled forward/backward pass over {len(probe.batches)} batches + the factors' eigendecompositions; "
           f"{probes} probe passes")
    return FitEstimate(dict(factors), seconds, how)


def estimate_kfac_factors(probe: FitProbe) -> tuple[dict[str, KroneckerFactors], float, int]:
    """The K-FAC factors of the probe's last batch, the estimated seconds of the factors' fit, the probes."""
    model, params, pad, seed = probe.model, probe.params, probe.pad_token_id, probe.seed
    last: dict[str, Any] = {}

    def sampled_pass(batch: Sequence[TokenizedExample]) -> None:
        last["sums"] = kfac_sums(model, params, batch, pad, len(batch), seed)

    seconds, probes = probe.time_batches(sampled_pass, probe.batches)
    sums_a, sums_g, positions = last["sums"]
    factors, eigh_s = probe.time_once(lambda: kfac_factors(model, params, sums_a, sums_g, len(probe.items), positions))
    return factors, seconds + eigh_s, probes


register_curvature_method(CurvatureMethod(
    name="kfac", file_name=KFAC_FILE, fit=fit_function(fit_kfac, "batch_size", "seed", "distributed"),
    from_tensors=KroneckerFactors, summary="K-FAC factors", help="Kronecker factors per LoRA layer",
    estimate_fit=estimate_kfac_fit,
))
