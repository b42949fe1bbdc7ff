"""The exact Gauss–Newton matrix as a low-rank factor: one factorisation, every damping.

For softmax cross-entropy the Gauss–Newton matrix of ``curvature.operators`` is a sum over the response
positions t of example i (weight w_t = 1/T_i, as the loss has it) of J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t / N,
and diag(p) − ppᵀ = Σ_v p_v (e_v − p)(e_v − p)ᵀ, with J_tᵀ(e_v − p_t) = ∇_θ log p_t(v). So

    C = RᵀR,   the rows of R:  r_{i,t,v} = √(w_t p_t(v) / N) · ∇_θ log p_t(v)      (one per position and token)

exactly, when v runs over the whole vocabulary. A model's answer distribution is concentrated on a few
tokens, so keeping the ``top_k`` most probable v per position gives a factor of n × T × k rows whose
``coverage`` (the probability mass kept, per position) says how close it is; with top_k = vocabulary size
it is exact. From the eigendecomposition RRᵀ = U diag(σ) Uᵀ (m × m, m the rows), Woodbury gives

    (RᵀR + μI)⁻¹ b = (b − Rᵀ U diag(1/(σ + μ)) Uᵀ R b) / μ,    μ = λ_wd + λ > 0,

for every damping λ at the cost of two products with R. Costs m backward passes (batched per example) and
m × p numbers of memory: useful as the reference solver wherever n × response tokens is small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import TokenizedExample, aligned_labels, iter_batches, model_inputs, shifted_targets
from llmeraser.errors import ConfigError

MAX_FACTOR_BYTES = 8 * 2**30  # the rows as float32: refuse a factor larger than this


@dataclass
class LowRankGaussNewton:
    """C = RᵀR (``rows`` R, shape (m, p), float64) with RRᵀ's eigendecomposition; ``weight_decay`` λ_wd is
    added to every product and solve; ``coverage``: per kept position, the probability mass of its kept
    tokens, shape (positions,)."""

    rows: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    weight_decay: float
    coverage: Tensor

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def matvec(self, vector: Tensor, damping: float = 0.0) -> Tensor:
        """(C + (λ_wd + damping) I) v for v of shape (p,)."""
        v = vector.to(torch.float64)
        product = self.rows.T @ (self.rows @ v) + (self.weight_decay + damping) * v
        return product.to(vector.dtype)

    def solve(self, b: Tensor, damping: float = 0.0) -> Tensor:
        """(C + (λ_wd + damping) I)⁻¹ b by Woodbury (module docstring); needs λ_wd + damping > 0."""
        shift = self.weight_decay + damping
        if shift <= 0:
            raise ValueError(f"the low-rank solve needs weight decay + damping > 0, got {shift}")
        rhs = b.to(torch.float64)
        projected = self.eigenvectors.T @ (self.rows @ rhs)
        inner = self.eigenvectors @ (projected / (self.eigenvalues + shift))
        return ((rhs - self.rows.T @ inner) / shift).to(b.dtype)


def gauss_newton_rows(
    model: Any, params: AdapterParameters, items: Sequence[TokenizedExample], pad_token_id: int, top_k: int,
    batch_size: int = 8, total: int | None = None, row_chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """R of the module docstring over ``items`` (N = ``total`` or len(items)), shape (m, p) float64, and the
    coverage per position. One forward per batch of examples, one batched backward per ``row_chunk`` rows."""
    count = total if total is not None else len(items)
    rows: list[Tensor] = []
    coverage: list[Tensor] = []
    for batch in iter_batches(items, batch_size, pad_token_id):
        with torch.enable_grad():
            logits = model(**model_inputs(batch, model)).logits[:, :-1]
            _, weights = shifted_targets(aligned_labels(batch, model))
            log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
            where = weights > 0  # (B, L-1): the response positions
            positions = log_probs[where]  # (P, V)
            k = min(top_k, positions.shape[-1])
            top = positions.detach().topk(k, dim=-1)
            chosen = positions.gather(1, top.indices)  # (P, k) log p_t(v), differentiable
            scale = torch.sqrt(weights[where].to(torch.float64).unsqueeze(1) * top.values.exp() / count)
            flat_chosen, count_here = chosen.reshape(-1), chosen.numel()
            pieces = []
            for start in range(0, count_here, row_chunk):  # a batched backward holds a chunk's activation grads
                stop = min(start + row_chunk, count_here)
                outputs = torch.zeros(stop - start, count_here, dtype=chosen.dtype)
                outputs[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                grads = torch.autograd.grad(flat_chosen, params.tensors, grad_outputs=outputs, is_grads_batched=True,
                                            allow_unused=True, retain_graph=stop < count_here)
                pieces.append(torch.cat([torch.zeros(stop - start, t.numel(), dtype=torch.float64) if g is None
                                         else g.reshape(stop - start, -1).to(torch.float64)
                                         for g, t in zip(grads, params.tensors)], dim=1))
        rows.append(torch.cat(pieces) * scale.reshape(-1, 1))
        coverage.append(top.values.exp().sum(dim=-1))
    return torch.cat(rows), torch.cat(coverage)


def low_rank_gauss_newton(
    model: Any, params: AdapterParameters, items: Sequence[TokenizedExample], pad_token_id: int, *,
    top_k: int, weight_decay: float, batch_size: int = 8, row_chunk: int = 64,
) -> LowRankGaussNewton:
    """Build R at the model's current θ and factorise RRᵀ; refuses (``ConfigError`` on ``top_k``) when the
    rows would take more than ``MAX_FACTOR_BYTES`` as float32."""
    positions = sum(len(item.loss_positions()) for item in items)
    top_k = min(top_k, int(model.get_output_embeddings().weight.shape[0]))
    size = positions * top_k * params.dim * 4
    if size > MAX_FACTOR_BYTES:
        raise ConfigError("top_k", f"the low-rank Gauss–Newton factor would hold {positions} positions × {top_k} "
                                   f"tokens × {params.dim} parameters ({size / 2**30:.1f} GiB > "
                                   f"{MAX_FACTOR_BYTES / 2**30:.0f} GiB): use fewer examples or tokens, or cg")
    rows, coverage = gauss_newton_rows(model, params, items, pad_token_id, top_k, batch_size, row_chunk=row_chunk)
    eigenvalues, eigenvectors = torch.linalg.eigh(rows @ rows.T)
    return LowRankGaussNewton(rows, eigenvalues.clamp_min(0.0), eigenvectors, weight_decay, coverage)
