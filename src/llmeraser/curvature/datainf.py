"""DataInf (Kwon et al. 2024): per-example loss gradients, each θ tensor's block inverted by a closed form.

The curvature of θ tensor l is K_l = (1/n) Σ_i g_i g_iᵀ + λ_l I over the per-example loss gradients g_i;
(K_l + shift·I)⁻¹ is replaced by the mean of the per-example Sherman–Morrison inverses
(``datainf_inverse_product``). Stored as ``datainf.safetensors`` (the gradients, float32, and λ_l per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.registry import (
    CurvatureLayer,
    CurvatureMethod,
    FitEstimate,
    FitProbe,
    fit_function,
    register_curvature_method,
)
from llmeraser.data import TokenizedExample

DATAINF_FILE = "datainf.safetensors"
MIB = 2.0**20


def datainf_damping(gradients: Tensor) -> float:
    """DataInf's damping of one layer, λ_l = 0.1 · mean_i ‖g_i‖² / d_l, for ``gradients`` (n, d_l)."""
    return 0.1 * float((gradients.to(torch.float64) ** 2).sum(dim=1).mean()) / gradients.shape[1]


def datainf_inverse_product(gradients: Tensor, vector: Tensor, damping: float) -> Tensor:
    """DataInf's closed form (Kwon et al. 2024) of ((1/n) Σ_i g_i g_iᵀ + λI)⁻¹ v, for ``gradients`` (n, d)
    and ``vector`` (d,): the mean of the per-example Sherman–Morrison inverses (g_i g_iᵀ + λI)⁻¹ v,

        (1/(n λ)) Σ_i [v − (g_iᵀ v) / (λ + ‖g_i‖²) · g_i]     (exact for n = 1; shape (d,)).
    """
    if damping <= 0:
        raise ValueError(f"DataInf needs a damping > 0, got {damping}")
    coefficients = (gradients @ vector) / (damping + (gradients**2).sum(dim=1))
    return (vector - gradients.T @ coefficients / len(gradients)) / damping


@dataclass
class DataInfLayer:
    """Per-example gradients ``gradients`` (n, *shape) of one θ tensor and DataInf's ``damping`` λ_l (a
    0-d tensor): the curvature K = (1/n) Σ_i g_i g_iᵀ + λ_l I, inverted by the closed form."""

    gradients: Tensor
    damping: Tensor

    method = "datainf"

    def inverse_product(self, matrix: Tensor, shift: float) -> Tensor:
        """≈ (K + shift·I)⁻¹ applied to a θ-tensor-shaped matrix (DataInf with λ = λ_l + shift)."""
        rows = self.gradients.reshape(len(self.gradients), -1).to(matrix.dtype)
        solved = datainf_inverse_product(rows, matrix.reshape(-1), float(self.damping) + shift)
        return solved.view(matrix.shape)

    def product(self, matrix: Tensor) -> Tensor:
        """K applied to a θ-tensor-shaped matrix: (1/n) Σ_i g_i (g_iᵀ v) + λ_l v."""
        rows = self.gradients.reshape(len(self.gradients), -1).to(matrix.dtype)
        vector = matrix.reshape(-1)
        return (rows.T @ (rows @ vector) / len(rows) + float(self.damping) * vector).view(matrix.shape)


def fit_datainf(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
    damping: float | None = None,
) -> dict[str, DataInfLayer]:
    """DataInf's curvature of every θ tensor: the per-example loss gradients over ``items`` (float32;
    n × p numbers in all) and λ_l = ``damping``, or DataInf's 0.1 · mean_i ‖g_i‖² / d_l when None."""
    from llmeraser.gradients import per_example_gradients

    rows = per_example_gradients(model, params, items, pad_token_id, chunk_size=batch_size)
    layers = {}
    pieces = torch.split(rows, [s.numel() for s in params.shapes], 1)
    for name, shape, piece in zip(params.names, params.shapes, pieces):
        value = datainf_damping(piece) if damping is None else damping
        layers[name] = DataInfLayer(
            piece.reshape(len(rows), *shape).to(torch.float32).contiguous(), torch.tensor(value, dtype=torch.float64)
        )
    return layers


def estimate_datainf_fit(probe: FitProbe) -> FitEstimate:
    """The dry run's DataInf fit: the per-example gradients of every batch; the layers stand for the n × p
    per-example gradients the real run stores (the probe's, repeated), and the extra memory is their
    concatenation in θ's dtype before the float32 copy."""
    model, params, pad = probe.model, probe.params, probe.pad_token_id
    last: dict[str, dict[str, DataInfLayer]] = {}

    def gradients(batch: Sequence[TokenizedExample]) -> None:
        last["layers"] = fit_datainf(model, params, batch, pad, len(batch), probe.damping)

    seconds, probes = probe.time_batches(gradients, probe.batches)
    n = len(probe.items)
    layers: dict[str, CurvatureLayer] = {
        name: DataInfLayer(_repeat_rows(layer.gradients, n), layer.damping) for name, layer in last["layers"].items()
    }
    extra_mib = n * params.dim * params.tensors[0].element_size() / MIB
    how = f"per-example gradients over {len(probe.batches)} batches; {probes} probe passes"
    return FitEstimate(layers, seconds, how, extra_mib)


def _repeat_rows(rows: Tensor, count: int) -> Tensor:
    """``count`` rows made of ``rows`` repeated (the shape, dtype and memory of ``count`` real ones)."""
    repeats = math.ceil(count / max(len(rows), 1))
    return rows.repeat(repeats, *([1] * (rows.dim() - 1)))[:count].contiguous()


register_curvature_method(CurvatureMethod(
    name="datainf", file_name=DATAINF_FILE,
    fit=fit_function(fit_datainf, "batch_size", "damping"),  # on all items on every rank: not distributed
    from_tensors=DataInfLayer, summary="DataInf per-example gradients",
    help="per-example gradients for DataInf's closed form (stores n x p float32 numbers: bound n with "
    "--curvature-examples)",
    takes_damping=True, estimate_fit=estimate_datainf_fit,
))
