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

Two variants share the cache: EK-FAC (``fit_ekfac``) keeps Q_A, Q_G and refits the eigenvalues from
per-example gradients of the same sampled loss; DataInf (``fit_datainf``) stores per-example loss
gradients and inverts each block by its closed form (``datainf_inverse_product``).

Stored as ``kfac.safetensors`` (eigenvectors and eigenvalues per layer; ``datainf.safetensors`` for
DataInf) + ``curvature.json`` (the method as ``kind``, the hashes of base model, adapter and data it was
fitted on, and its settings), and refused on a mismatch. ``curvature.json`` may also hold a
``calibration`` (``calibrate_step_length``): the step length α of v = α (K + shift·I)⁻¹ b against the exact
operator, fitted once so that ``erase --curvature-use direct`` needs no exact curvature product.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.data import (
    TokenizationConfig,
    TokenizedExample,
    aligned_labels,
    collate,
    forward_logits,
    shifted_targets,
    tokenize_examples,
)
from llmeraser.distributed import all_reduce_sum, shard
from llmeraser.errors import InputError
from llmeraser.model import AdapterParameters, atomic_directory

CURVATURE_FILE = "kfac.safetensors"
DATAINF_FILE = "datainf.safetensors"
CURVATURE_META = "curvature.json"
MAX_FACTOR_DIM = 8192
# the step-length calibration's defaults (fit_cached_curvature, curvature_cache.CurvatureFitConfig, fit-curvature)
CALIBRATION_EXAMPLES = 16
CALIBRATION_DIRECTIONS = 8
CALIBRATION_DAMPING = 1e-2


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
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel's
    base: Any = get_base_model() if get_base_model is not None else model  # a transformers model
    head = base.get_output_embeddings()
    head_names = {n for n, m in base.named_modules() if m is head or getattr(m, "base_layer", None) is head}
    return {name for name in params.names if any(f"{h}.lora_" in name for h in head_names)}


def _suffix(mask: Tensor, length: int) -> Tensor:
    """The last ``length`` positions of a (B, L, 1) mask: layers after ``logits_to_keep`` see a suffix."""
    return mask[:, mask.shape[1] - length :]


def _check_factor_sizes(layers: dict[str, torch.nn.Linear]) -> None:
    too_large = [n for n, m in layers.items() if max(m.in_features, m.out_features) > MAX_FACTOR_DIM]
    if too_large:
        raise InputError(
            f"K-FAC factors are limited to {MAX_FACTOR_DIM} rows; '{too_large[0]}' is "
            f"{layers[too_large[0]].out_features}×{layers[too_large[0]].in_features} (a LoRA on the vocabulary "
            "projection?): use the exact curvature operator instead of a curvature cache"
        )


LayerCallback = Callable[[str, Tensor, dict[str, Tensor]], None]


def _sampled_passes(
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
    ``distributed``: only this rank's batches (``_sampling_batches``); the caller all-reduces its sums.
    """
    state: dict[str, Tensor] = {}
    handles = []

    def forward_hook(name: str) -> Callable[[torch.nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            on_input(name, inputs[0].detach().to(torch.float64), state)
        return hook

    def backward_hook(name: str) -> Callable[[torch.nn.Module, tuple, tuple[Tensor, ...]], None]:
        def hook(module: torch.nn.Module, grad_input: tuple, grad_output: tuple[Tensor, ...]) -> None:
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
        for batch, generator in _sampling_batches(items, batch_size, pad_token_id, seed, distributed):
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
    return loss_positions


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
        loss_positions = _all_reduce_sums([*sums_a.values(), *sums_g.values()], loss_positions)
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
    _check_factor_sizes(layers)
    sums_a = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    sums_g = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for name, m in layers.items()}
    expand = output_layer_names(model, params)

    def on_input(name: str, a: Tensor, state: dict[str, Tensor]) -> None:
        if name in expand:  # per position: only the positions that carry a loss
            a = a * state["loss_mask"]
            sums_a[name] += torch.einsum("bsi,bsj->ij", a, a)
        else:
            mask = _suffix(state["mask"], a.shape[1])
            mean_a = (a * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
            sums_a[name] += mean_a.T @ mean_a

    def on_output_grad(name: str, delta: Tensor, state: dict[str, Tensor]) -> None:
        if name in expand:
            delta = delta * state["loss_mask"]
            sums_g[name] += torch.einsum("bsi,bsj->ij", delta, delta)
        else:
            summed = (delta * _suffix(state["mask"], delta.shape[1])).sum(dim=1)
            sums_g[name] += summed.T @ summed

    loss_positions = _sampled_passes(
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
        _all_reduce_sums(list(sums.values()), 0)
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

    _sampled_passes(model, layers, params, items, pad_token_id, batch_size, seed, on_input, on_output_grad, distributed)
    return sums


# --- data parallelism: the batches a rank fits on, and the reduction of its sums -----------------------


def _sampling_batches(
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


def _all_reduce_sums(sums: Sequence[Tensor], count: int) -> int:
    """Sum ``sums`` (in place) and ``count`` over ranks; returns the summed count."""
    for tensor in sums:
        all_reduce_sum(tensor)
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.long)).item())


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
    for name, shape, piece in zip(params.names, params.shapes, torch.split(rows, [s.numel() for s in params.shapes], 1)):
        value = datainf_damping(piece) if damping is None else damping
        layers[name] = DataInfLayer(
            piece.reshape(len(rows), *shape).to(torch.float32).contiguous(), torch.tensor(value, dtype=torch.float64)
        )
    return layers


CurvatureLayer = KroneckerFactors | DataInfLayer
METHODS = ("kfac", "ekfac", "datainf")


def cache_method(layers: dict[str, CurvatureLayer]) -> str:
    """The method of a fitted curvature: ``kfac``, ``ekfac`` or ``datainf``."""
    methods = {layer.method for layer in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"a curvature cache holds one method, got {sorted(methods)}")
    return methods.pop()


@dataclass
class KfacInverse:
    """v ↦ (K + shift·I)⁻¹ v for a flat θ-shaped vector, K the block-diagonal cached curvature (K-FAC,
    EK-FAC or DataInf: one ``KroneckerFactors`` / ``DataInfLayer`` per θ tensor)."""

    factors: dict[str, CurvatureLayer]
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


def step_length(g: Tensor, d: Tensor, hd: Tensor) -> float:
    """The step length α = gᵀd / dᵀH̃d along a direction d (p,), for a right-hand side g (p,) and the
    exact product H̃d = (H + shift·I) d (p,): the minimiser of the quadratic model ½α² dᵀH̃d − α gᵀd of
    ½ vᵀH̃v − gᵀv along v = α d (so α d is never worse than v = 0 in that model). With d = (K + shift·I)⁻¹ g
    it corrects the scale of the cached curvature K. Returns 1.0 (d as it is) when dᵀH̃d ≤ 0."""
    curvature = float(d.to(torch.float64) @ hd.to(torch.float64))
    return float(g.to(torch.float64) @ d.to(torch.float64)) / curvature if curvature > 0 else 1.0


def curvature_file(method: str) -> str:
    """The tensor file of a cache of ``method``."""
    return DATAINF_FILE if method == "datainf" else CURVATURE_FILE


def cache_tensors(factors: dict[str, CurvatureLayer]) -> dict[str, Tensor]:
    """The tensors of the cache's tensor file: ``layer::field`` for every stored field of every layer."""
    tensors = {}
    for name, factor in factors.items():
        for field in fields(factor):
            value = getattr(factor, field.name)
            if value is not None:
                tensors[f"{name}::{field.name}"] = value.contiguous()
    return tensors


def save_kfac(
    factors: dict[str, CurvatureLayer], out_dir: str | Path, metadata: dict[str, Any]
) -> Path:
    """Write the tensors (``kfac.safetensors``, or ``datainf.safetensors``) + ``curvature.json``, whose
    ``kind`` records the method, to a new directory (atomically, ``atomic_directory``)."""
    from safetensors.torch import save_file

    method = cache_method(factors)
    with atomic_directory(out_dir) as tmp:
        save_file(cache_tensors(factors), str(tmp / curvature_file(method)))
        metadata = {**metadata, "kind": method}
        (tmp / CURVATURE_META).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def load_kfac(curvature_dir: str | Path, expected: dict[str, str]) -> tuple[dict[str, CurvatureLayer], dict[str, Any]]:
    """Read a fitted curvature of any method (``metadata["kind"]``); raise ``InputError`` if any
    ``expected`` hash differs from the stored one."""
    from safetensors.torch import load_file

    curvature_dir = Path(curvature_dir)
    meta_path = curvature_dir / CURVATURE_META
    metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    method = metadata.get("kind", "kfac")
    if method not in METHODS:
        raise InputError(f"unknown curvature method '{method}' in {CURVATURE_META}", curvature_dir)
    if not meta_path.is_file() or not (curvature_dir / curvature_file(method)).is_file():
        raise InputError(f"not a curvature directory (needs {CURVATURE_META} and {curvature_file(method)})", curvature_dir)
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise InputError(
                f"the curvature was fitted for a different {key.removesuffix('_sha256').replace('_', ' ')} "
                f"(stored {str(metadata.get(key))[:12]}…, given {value[:12]}…); fit it again with fit-curvature",
                curvature_dir,
            )
    tensors = load_file(str(curvature_dir / curvature_file(method)))
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, field = key.split("::")
        layers.setdefault(name, {})[field] = tensor
    kind = DataInfLayer if method == "datainf" else KroneckerFactors
    return {name: kind(**values) for name, values in layers.items()}, metadata


def curvature_subset(examples: Sequence[Any], count: int | None, seed: int) -> list[Any]:
    """The examples ``fit-curvature --curvature-examples count`` fits on: a seeded random subset of ``count``
    (in the data's order), or all of them when ``count`` is None or not smaller."""
    if count is None or count >= len(examples):
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return [examples[i] for i in sorted(order[:count].tolist())]


def calibration_pool(
    tokenizer: Any,
    examples: Sequence[Any],
    fitted: Sequence[TokenizedExample],
    calibration_examples: int,
    config: TokenizationConfig,
) -> Sequence[TokenizedExample]:
    """The items ``fit-curvature`` calibrates the step length on: all ``examples``, tokenised — the
    ``fitted`` items themselves when they are all of them, or when there is no calibration."""
    if calibration_examples == 0 or len(fitted) == len(examples):
        return fitted
    return tokenize_examples(tokenizer, examples, config)


def fit_and_time(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int,
    seed: int,
    distributed: bool = False,
    method: str = "kfac",
    damping: float | None = None,
) -> tuple[dict[str, CurvatureLayer], float]:
    """Fit the curvature of ``method`` (kfac | ekfac | datainf; ``damping``: DataInf's λ_l, default its
    heuristic) and its wall time in seconds. DataInf is fitted on all ``items`` on every rank."""
    start = time.perf_counter()
    if method == "kfac":
        factors: dict[str, CurvatureLayer] = dict(fit_kfac(model, params, items, pad_token_id, batch_size, seed, distributed))
    elif method == "ekfac":
        factors = dict(fit_ekfac(model, params, items, pad_token_id, batch_size, seed, distributed))
    elif method == "datainf":
        factors = dict(fit_datainf(model, params, items, pad_token_id, batch_size, damping))
    else:
        raise ValueError(f"unknown curvature method {method!r} (expected one of: {', '.join(METHODS)})")
    return factors, time.perf_counter() - start


# --- step length of the cached curvature, calibrated once at fit time ----------------------------------

SHIFT_RTOL = 1e-6


@dataclass(frozen=True)
class StepCalibration:
    """The step length α of ``erase --curvature-use direct`` (v = α (K + shift·I)⁻¹ b), fitted once.

    ``step_length``: the median of ``step_lengths`` α_j = step_length(g_j, d_j, H̃d_j) over per-example loss
    gradients g_j of random training examples, d_j = (K + shift·I)⁻¹ g_j, H̃ = H + shift·I the exact
    ``curvature`` operator over ``n_examples`` random training examples with shift = ``damping`` +
    ``weight_decay``; ``residuals``: ‖α H̃ d_j − g_j‖ / ‖g_j‖ at the median α. Valid for an erasure whose
    total shift and curvature kind are the same (``mismatch``).
    """

    step_length: float
    step_lengths: list[float]
    residuals: list[float]
    damping: float
    weight_decay: float
    curvature: str
    n_examples: int
    n_directions: int
    seed: int
    time_s: float

    @property
    def shift(self) -> float:
        """The multiple of the identity in H̃: damping + weight decay."""
        return self.damping + self.weight_decay

    def mismatch(self, shift: float, curvature: str) -> str | None:
        """Why this calibration does not hold for an erasure with total ``shift`` (damping + weight decay)
        and ``curvature`` kind; None when it does (shifts equal within relative tolerance ``SHIFT_RTOL``)."""
        if curvature != self.curvature:
            return f"the step length was calibrated for the {self.curvature} curvature, the erasure uses {curvature}"
        if abs(shift - self.shift) > SHIFT_RTOL * max(abs(shift), abs(self.shift)):
            return (f"the step length was calibrated at damping + weight decay = {self.damping:g} + {self.weight_decay:g} "
                    f"= {self.shift:g}, the erasure uses {shift:g}")
        return None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shift": self.shift}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepCalibration:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def load_calibration(metadata: dict[str, Any]) -> StepCalibration | None:
    """The step-length calibration stored in a cache's ``curvature.json`` (``load_kfac``'s metadata), if any."""
    stored = metadata.get("calibration")
    return StepCalibration.from_json(stored) if stored else None


def calibration_draws(
    items: Sequence[TokenizedExample], examples: int, directions: int, seed: int
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """The seeded random draws of ``calibrate_step_length``: (the exact operator's ``examples`` items, the
    ``directions`` items whose per-example gradients give the directions), each in the items' order."""
    subset = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[: min(examples, len(items))]
    drawn = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 1))[: min(directions, len(items))]
    return [items[i] for i in sorted(subset.tolist())], [items[i] for i in sorted(drawn.tolist())]


def calibrate_step_length(
    model: Any,
    params: AdapterParameters,
    factors: dict[str, CurvatureLayer],
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    examples: int = 16,
    directions: int = 8,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
    curvature: str = "gauss-newton",
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> StepCalibration:
    """Fit ``StepCalibration`` for the cached curvature ``factors`` on the training ``items``: the exact
    operator over a seeded random subset of ``examples`` items, the directions from the per-example loss
    gradients of ``directions`` other random draws (the gradients b is made of). Costs ``directions``
    exact products over the subset and one per-example gradient pass. ``distributed``: every rank computes
    the same directions; the operator's examples are sharded and its products all-reduced."""
    from llmeraser.curvature import CurvatureOperator
    from llmeraser.gradients import per_example_gradients

    start = time.perf_counter()
    curvature_items, direction_items = calibration_draws(items, examples, directions, seed)
    operator = CurvatureOperator(
        model, params, shard(curvature_items) if distributed else curvature_items, pad_token_id,
        curvature, damping, weight_decay, batch_size, distributed=distributed,  # type: ignore[arg-type]
    )
    gradients = per_example_gradients(model, params, direction_items, pad_token_id, batch_size)
    inverse = KfacInverse(factors, params, operator.shift)
    solved = torch.stack([inverse(g) for g in gradients])
    products = operator.matmat(solved)
    alphas = [step_length(g, d, hd) for g, d, hd in zip(gradients, solved, products)]
    alpha = statistics.median(alphas)
    residuals = [float((alpha * hd - g).norm() / g.norm()) if float(g.norm()) > 0 else 0.0
                 for g, hd in zip(gradients, products)]
    return StepCalibration(alpha, alphas, residuals, damping, weight_decay, curvature, operator.count, len(alphas),
                           seed, time.perf_counter() - start)


@dataclass
class CachedCurvature:
    """A fitted curvature cache with its fit-time step length: what ``fit-curvature`` writes and
    ``erase --curvature-use direct`` reads. ``fit_s``, ``calibration.time_s``: wall seconds."""

    factors: dict[str, CurvatureLayer]
    calibration: StepCalibration | None
    fit_s: float


def fit_cached_curvature(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    method: str = "ekfac",
    *,
    damping: float = CALIBRATION_DAMPING,
    weight_decay: float = 0.0,
    curvature: str = "gauss-newton",
    batch_size: int = 8,
    seed: int = 0,
    calibration_examples: int = CALIBRATION_EXAMPLES,
    calibration_directions: int = CALIBRATION_DIRECTIONS,
    calibration_items: Sequence[TokenizedExample] | None = None,
    datainf_damping: float | None = None,
    distributed: bool = False,
) -> CachedCurvature:
    """Fit the ``method`` curvature on ``items`` and calibrate its step length (``calibrate_step_length``)
    for erasures at ``damping`` + ``weight_decay`` on ``calibration_items`` (default: ``items``);
    ``calibration_examples=0``: no calibration (``erase`` then probes the exact operator itself)."""
    factors, seconds = fit_and_time(model, params, items, pad_token_id, batch_size, seed, distributed, method,
                                    datainf_damping)
    calibration = None
    if calibration_examples > 0:
        calibration = calibrate_step_length(
            model, params, factors, items if calibration_items is None else calibration_items, pad_token_id,
            calibration_examples, calibration_directions, damping, weight_decay, curvature, batch_size, seed, distributed,
        )
    return CachedCurvature(factors, calibration, seconds)
