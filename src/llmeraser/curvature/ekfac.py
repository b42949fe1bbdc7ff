"""EK-FAC (George et al. 2018): the K-FAC eigenbases with the eigenvalues refitted from per-example gradients.

``fit_ekfac`` keeps the K-FAC eigenvectors Q_A, Q_G of every LoRA weight (``llmeraser.curvature.kfac``) and
replaces the Kronecker eigenvalues by the diagonal of the per-example gradients' second moment in that basis,
from a second sampled pass with the same labels (``llmeraser.curvature.hooks``). Stored in the same
``kfac.safetensors`` as K-FAC, with the refitted eigenvalues as ``corrected``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.hooks import all_reduce_sums, lora_layers, sampled_passes
from llmeraser.curvature.kfac import KFAC_FILE, KroneckerFactors, estimate_kfac_factors, fit_kfac
from llmeraser.curvature.registry import (
    CurvatureMethod,
    FitEstimate,
    FitProbe,
    fit_function,
    register_curvature_method,
)
from llmeraser.data import TokenizedExample


def eigenbasis_diagonal(factor: KroneckerFactors, gradients: Tensor) -> Tensor:
    """Σ_i (Q_Gᵀ g_i Q_A)² for per-example weight gradients ``gradients`` (n, out, in): the (unnormalised)
    diagonal of Σ_i vec(g_i) vec(g_i)ᵀ in the Kronecker eigenbasis, shape (out, in)."""
    rotated = factor.g_vectors.T @ gradients.to(factor.g_vectors.dtype) @ factor.a_vectors
    return (rotated**2).sum(dim=0)


def fit_ekfac(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> dict[str, KroneckerFactors]:
    """EK-FAC (George et al. 2018): the K-FAC eigenbases Q_A, Q_G of every LoRA weight, with the diagonal
    refitted in that basis, Λ = (1/N) Σ_i (Q_Gᵀ g_i Q_A)² (out × in), g_i = Σ_s δ_is a_isᵀ the exact
    per-example gradient of the sampled loss (a second pass with the same labels, from the same hooks).
    Λ is the best diagonal in the eigenbasis: it minimises ‖Q diag(Λ) Qᵀ − (1/N) Σ_i vec(g_i)vec(g_i)ᵀ‖_F.
    ``distributed``: as for ``fit_kfac``."""
    factors = fit_kfac(model, params, items, pad_token_id, batch_size, seed, distributed)
    sums = ekfac_sums(model, params, factors, items, pad_token_id, batch_size, seed, distributed)
    if distributed:
        all_reduce_sums(list(sums.values()), 0)
    return {name: replace(factor, corrected=pooled_over_null_spaces(factor, sums[name] / len(items)))
            for name, factor in factors.items()}


NULL_RTOL = 1e-10


def pooled_over_null_spaces(factor: KroneckerFactors, diagonal: Tensor, rtol: float = NULL_RTOL) -> Tensor:
    """The EK-FAC diagonal Λ (out × in) made independent of the arbitrary eigenvectors of A's and G's null
    spaces (eigenvalues ≤ ``rtol`` × the largest; K-FAC reduce's A has rank ≤ N, below the layer width for
    few examples). Inside a null space eigh returns any orthonormal basis — a different one for sums
    added in another order, e.g. on 2 processes — and Λ's entries there depend on it; their mean over the
    null-space indices (per row for A's, per column for G's, over the block for both) does not. The mean is
    the best (Frobenius) choice among diagonals that are constant on those blocks."""
    pooled = diagonal.clone()
    null_a = factor.a_values <= rtol * factor.a_values.max()
    null_g = factor.g_values <= rtol * factor.g_values.max()
    if int(null_a.sum()) > 1:
        pooled[:, null_a] = pooled[:, null_a].mean(dim=1, keepdim=True)
    if int(null_g.sum()) > 1:
        pooled[null_g, :] = pooled[null_g, :].mean(dim=0, keepdim=True)
    return pooled


def ekfac_sums(
    model: Any,
    params: AdapterParameters,
    factors: dict[str, KroneckerFactors],
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> dict[str, Tensor]:
    """The second pass of ``fit_ekfac``: Σ_i (Q_Gᵀ g_i Q_A)² of every LoRA layer over this process's batches."""
    layers = lora_layers(model, params)
    sums = {name: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    inputs: dict[str, Tensor] = {}

    def on_input(name: str, a: Tensor, state: dict[str, Tensor]) -> None:
        inputs[name] = a

    def on_output_grad(name: str, delta: Tensor, state: dict[str, Tensor]) -> None:
        # δ is zero where no loss depends on the position (padding, past the last response token)
        gradients = torch.einsum("bso,bsi->boi", delta, inputs.pop(name))
        sums[name] += eigenbasis_diagonal(factors[name], gradients)

    sampled_passes(model, layers, params, items, pad_token_id, batch_size, seed, on_input, on_output_grad, distributed)
    return sums


def estimate_ekfac_fit(probe: FitProbe) -> FitEstimate:
    """The dry run's EK-FAC fit: K-FAC's (``estimate_kfac_fit``) + the second sampled pass (``ekfac_sums``)."""
    factors, seconds, probes = estimate_kfac_factors(probe)
    model, params, pad, seed = probe.model, probe.params, probe.pad_token_id, probe.seed
    second, second_probes = probe.time_batches(
        lambda batch: ekfac_sums(model, params, factors, batch, pad, len(batch), seed), probe.batches
    )
    how = (f"2 sampled forward/backward passes over {len(probe.batches)} batches + the factors' "
           f"eigendecompositions; {probes + second_probes} probe passes")
    return FitEstimate(dict(factors), seconds + second, how)


register_curvature_method(CurvatureMethod(
    name="ekfac", file_name=KFAC_FILE, fit=fit_function(fit_ekfac, "batch_size", "seed", "distributed"),
    from_tensors=KroneckerFactors, summary="EK-FAC factors",
    help="K-FAC eigenbases with the diagonal refitted from per-example gradients (a second pass)",
    estimate_fit=estimate_ekfac_fit,
))
