"""Curvature of the training objective in θ as linear operators v ↦ (C + (λ_wd + λ) I) v.

The training objective is R(θ) = (1/N) Σ_i ℓ_i(θ) + (λ_wd/2) ‖θ‖² over the N examples the operator
holds (ℓ_i: per-example mean response NLL, ``llmeraser.data.response_nll``). C is either

- the exact Hessian (1/N) Σ_i ∇²ℓ_i (``kind="hessian"``; double back-propagation; indefinite away from a
  minimum), or
- the Gauss–Newton matrix (1/N) Σ_i J_iᵀ Λ_i J_i (``kind="gauss-newton"``; J_i the Jacobian of the logits
  in θ, Λ_i the softmax cross-entropy Hessian weighted like the loss; PSD).

``damping`` λ ≥ 0 is added on top of the weight decay λ_wd. ``sample()`` returns the same operator on a
random mini-batch: an unbiased estimate of the full one, for the stochastic solvers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    shifted_targets,
)
from llmeraser.distributed import all_reduce_sum, rank, world_size
from llmeraser.errors import NumericalError

CurvatureKind = Literal["hessian", "gauss-newton"]
CURVATURE_KINDS: tuple[str, ...] = ("hessian", "gauss-newton")


def hessian_vector_product(
    model: torch.nn.Module, params: AdapterParameters, batch: dict[str, Tensor], vectors: Tensor, scale: float
) -> Tensor:
    """scale · Σ_{i∈batch} ∇²ℓ_i · v by double back-propagation, for v a (p,) vector or the k rows of a
    (k, p) matrix (one backward pass, batched with ``is_grads_batched``); returns the same shape."""
    matrix = vectors if vectors.dim() == 2 else vectors.unsqueeze(0)
    with torch.enable_grad():
        losses = example_losses(model, batch)
        grads = torch.autograd.grad(losses.sum() * scale, params.tensors, create_graph=True)
        pieces = torch.split(matrix, [t.numel() for t in params.tensors], dim=1)
        outputs = [piece.reshape(matrix.shape[0], *t.shape) for piece, t in zip(pieces, params.tensors)]
        product = torch.autograd.grad(
            grads, params.tensors, grad_outputs=outputs, allow_unused=True, is_grads_batched=True
        )
    rows = torch.cat(
        [
            (torch.zeros(matrix.shape[0], t.numel(), dtype=matrix.dtype) if p is None
             else p.reshape(matrix.shape[0], -1))
            for p, t in zip(product, params.tensors)
        ],
        dim=1,
    )
    return rows if vectors.dim() == 2 else rows[0]


def gauss_newton_vector_product(
    model: torch.nn.Module, params: AdapterParameters, batch: dict[str, Tensor], vectors: Tensor, scale: float
) -> Tensor:
    """scale · Σ_{i∈batch} J_iᵀ Λ_i J_i · v with forward-mode J v and reverse-mode Jᵀ u, for v a (p,)
    vector or the k rows of a (k, p) matrix (one product each); returns the same shape."""
    if vectors.dim() == 2:
        return torch.stack([gauss_newton_vector_product(model, params, batch, v, scale) for v in vectors])
    from torch.func import functional_call, jvp, vjp

    primals = dict(zip(params.names, (t.detach() for t in params.tensors)))
    tangents = params.as_dict(vectors)
    kwargs = model_inputs(batch, model)

    def logits_of(theta: dict[str, Tensor]) -> Tensor:
        return functional_call(model, theta, args=(), kwargs=kwargs, strict=False).logits

    with torch.enable_grad():
        # torch types the results as 2- or 3-tuples (the 3 with has_aux=True, not used here)
        logits, pullback = vjp(logits_of, primals)  # type: ignore[misc]
        _, jv = jvp(logits_of, (primals,), (tangents,))  # type: ignore[misc]
        _, weights = shifted_targets(aligned_labels(batch, model))
        probs = torch.softmax(logits[:, :-1].to(torch.float64), dim=-1)
        jv_shift = jv[:, :-1].to(torch.float64)
        lam_jv = probs * jv_shift - probs * (probs * jv_shift).sum(dim=-1, keepdim=True)
        lam_jv = lam_jv * (weights.to(torch.float64) * scale).unsqueeze(-1)
        cotangent = torch.zeros_like(logits)
        cotangent[:, :-1] = lam_jv.to(logits.dtype)
        (product,) = pullback(cotangent)
    return params.flatten([product[name] for name in params.names])


_PRODUCTS = {"hessian": hessian_vector_product, "gauss-newton": gauss_newton_vector_product}


@dataclass
class CurvatureOperator:
    """v ↦ (C + (weight_decay + damping) I) v over ``items``, computed in chunks of ``batch_size``.

    Satisfies the solvers' ``LinearOperator`` (``dim``, ``matvec``) and ``StochasticOperator``
    (``sample``) protocols. The model must be in eval mode (no dropout).
    """

    model: Any
    params: AdapterParameters
    items: Sequence[TokenizedExample]
    pad_token_id: int
    kind: CurvatureKind = "gauss-newton"
    damping: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 8
    distributed: bool = False
    total: int | None = None

    def __post_init__(self) -> None:
        if self.distributed and self.total is None:
            self.total = int(all_reduce_sum(torch.tensor([len(self.items)], dtype=torch.long)).item())
        if self.kind not in _PRODUCTS:
            raise ValueError(f"unknown curvature {self.kind!r} (expected one of: {', '.join(CURVATURE_KINDS)})")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.count == 0:
            raise ValueError("a curvature operator needs at least one example")

    @property
    def dim(self) -> int:
        return self.params.dim

    @property
    def count(self) -> int:
        """N: the number of examples averaged over (on all ranks together when distributed)."""
        return self.total if self.total is not None else len(self.items)

    @property
    def shift(self) -> float:
        """The multiple of the identity added to C: weight decay plus damping."""
        return self.weight_decay + self.damping

    def matvec(self, vector: Tensor) -> Tensor:
        """(C + shift·I) v for v of shape (p,), or row-wise for a (k, p) matrix of vectors."""
        product = _PRODUCTS[self.kind]
        scale = 1.0 / self.count
        result = torch.zeros_like(vector)
        for batch in iter_batches(self.items, self.batch_size, self.pad_token_id):
            result += product(self.model, self.params, batch, vector, scale)
        if self.distributed:
            all_reduce_sum(result)
        if not torch.isfinite(result).all():
            if not torch.isfinite(vector).all():  # the solver's iterate blew up, not the curvature
                raise NumericalError("the solver's iterate contains NaN or Inf (diverged)", stage="solve")
            raise NumericalError(
                f"the {self.kind} product over {self.count} examples contains NaN or Inf "
                "(NaN/Inf in the model's activations or the adapter's weights?)",
                stage="curvature",
            )
        return result + self.shift * vector

    def matmat(self, vectors: Tensor) -> Tensor:
        """Row-wise products for a (k, p) matrix; the Hessian shares one forward/backward per batch."""
        return self.matvec(vectors)

    def restrict(self, indices: Sequence[int]) -> CurvatureOperator:
        """The same operator over a subset of the examples, normalised by the subset's size.

        ``indices`` are global positions in the example list the operator stands for; when distributed,
        each rank keeps those in its strided shard (``llmeraser.distributed.shard``), so that the subset
        is the same as in a single process.
        """
        if not self.distributed:
            return replace(self, items=[self.items[i] for i in indices], total=None)
        here, step = rank(), world_size()
        local = [(i - here) // step for i in indices if i % step == here]
        return replace(self, items=[self.items[i] for i in local], total=len(indices))

    def sample(self, generator: torch.Generator) -> CurvatureOperator:
        """An unbiased mini-batch estimate: the operator over ``batch_size`` examples drawn without
        replacement (the same examples on one process or many)."""
        if self.count <= self.batch_size:
            return self
        indices = torch.randperm(self.count, generator=generator)[: self.batch_size]
        return self.restrict(sorted(indices.tolist()))
