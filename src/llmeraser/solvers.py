"""Solvers of A v = b for a symmetric operator A (here A = H + λI), knowing nothing about models.

Every solver takes an operator and b and returns a ``SolverResult``: v, the relative residual history
‖A v − b‖ / ‖b‖ (measured on the full operator, or on a fixed ``probe`` operator for the stochastic
solvers), iterations, convergence status and wall time.

- ``direct``: forms A explicitly (p matrix-vector products, in chunks) and solves; refuses p > ``max_dim``.
- ``cg``: conjugate gradient; stops and says so on non-positive curvature pᵀAp ≤ 0.
- ``lissa``: the stochastic Neumann series v ← b + v − A_B v / s, returning v / s (s > λ_max(A)).
- ``sgd``: the paper's finite-sum quadratic program min ½ vᵀAv − bᵀv by mini-batch SGD (with momentum)
  or Adam on the exact stochastic gradient A_B v − b, from v₀ = 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from llmeraser.errors import ConfigError, NumericalError

SolverName = Literal["direct", "cg", "lissa", "sgd"]
"""The solvers ``solve`` dispatches to (``SOLVERS``)."""

# defaults of the solvers' keyword arguments, read by the dry run (``llmeraser.estimate``) too
DIRECT_MAX_DIM = 4096  # solve_direct forms the p × p matrix up to this many parameters
DENSE_CHUNK_SIZE = 64  # basis vectors per batched product when forming the matrix
CHECK_EVERY = 10  # lissa / sgd: iterations between residual checks on the probe subset
POWER_ITERATIONS = 20  # power iterations of estimate_largest_eigenvalue (lissa's scale, sgd's lr)


def direct_too_large(dim: int, max_dim: int) -> ConfigError:
    """The error of a direct solve of ``dim`` parameters beyond ``max_dim``."""
    return ConfigError("solver", f"'direct' forms the {dim}×{dim} matrix; it is limited to {max_dim} parameters "
                       "(use cg, lissa or sgd, or raise solver_options max_dim knowingly)")


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on R^dim."""

    @property
    def dim(self) -> int: ...

    def matvec(self, vector: Tensor) -> Tensor: ...


@runtime_checkable
class StochasticOperator(LinearOperator, Protocol):
    """A finite-sum operator whose ``sample`` gives an unbiased mini-batch estimate of it."""

    def sample(self, generator: torch.Generator) -> LinearOperator: ...


@dataclass
class DenseOperator:
    """A ``LinearOperator`` (and trivially stochastic one) from an explicit (p, p) matrix."""

    matrix: Tensor

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def matvec(self, vector: Tensor) -> Tensor:
        return self.matrix @ vector

    def sample(self, generator: torch.Generator) -> DenseOperator:
        return self


@dataclass
class FiniteSumDenseOperator:
    """(1/N) Σ_i A_i + shift·I from explicit (N, p, p) terms; ``sample`` averages ``batch_size`` random terms."""

    terms: Tensor
    shift: float = 0.0
    batch_size: int = 1

    @property
    def dim(self) -> int:
        return self.terms.shape[1]

    def matvec(self, vector: Tensor) -> Tensor:
        return self.terms.mean(dim=0) @ vector + self.shift * vector

    def sample(self, generator: torch.Generator) -> FiniteSumDenseOperator:
        indices = torch.randperm(self.terms.shape[0], generator=generator)[: self.batch_size]
        return FiniteSumDenseOperator(self.terms[indices], self.shift, self.batch_size)


@dataclass
class SolverResult:
    """v with diagnostics. ``residuals[t]`` is the relative residual after ``iterations_at[t]`` iterations."""

    solution: Tensor
    solver: str
    iterations: int
    residuals: list[float]
    iterations_at: list[int]
    converged: bool
    status: str
    wall_time_s: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def final_residual(self) -> float:
        return self.residuals[-1] if self.residuals else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready diagnostics (no solution vector)."""
        return {
            "solver": self.solver,
            "iterations": self.iterations,
            "converged": self.converged,
            "status": self.status,
            "final_relative_residual": self.final_residual if self.residuals else None,  # None: not measured
            "residual_history": self.residuals,
            "residual_iterations": self.iterations_at,
            "wall_time_s": self.wall_time_s,
            **self.details,
        }


def relative_residual(operator: LinearOperator, vector: Tensor, b: Tensor) -> float:
    """‖A v − b‖ / ‖b‖ (‖b‖ = 0 gives ‖A v‖)."""
    norm_b = float(b.norm())
    residual = float((operator.matvec(vector) - b).norm())
    return residual / norm_b if norm_b > 0 else residual


def _check_finite(tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"{what} contains NaN or Inf")


def dense_matrix(operator: LinearOperator, dtype: torch.dtype, chunk_size: int = DENSE_CHUNK_SIZE) -> Tensor:
    """A as an explicit (p, p) matrix, built from products with basis vectors (of ``dtype``) in row chunks.

    Uses ``operator.matmat(E)`` for a (k, p) chunk of basis vectors when the operator provides it.
    """
    dim = operator.dim
    rows = []
    for start in range(0, dim, chunk_size):
        stop = min(start + chunk_size, dim)
        basis = torch.zeros(stop - start, dim, dtype=dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        if hasattr(operator, "matmat"):
            rows.append(operator.matmat(basis))
        else:
            rows.append(torch.stack([operator.matvec(e) for e in basis]))
    return torch.cat(rows)


def solve_direct(
    operator: LinearOperator, b: Tensor, max_dim: int = DIRECT_MAX_DIM, chunk_size: int = DENSE_CHUNK_SIZE
) -> SolverResult:
    """Form A (symmetrised) and solve in float64: Cholesky when A is positive definite, LU otherwise."""
    start = time.perf_counter()
    if operator.dim > max_dim:
        raise direct_too_large(operator.dim, max_dim)
    matrix = dense_matrix(operator, b.dtype, chunk_size).to(torch.float64)
    matrix = 0.5 * (matrix + matrix.T)
    _check_finite(matrix, "the curvature matrix")
    eigenvalues = torch.linalg.eigvalsh(matrix)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        solution = torch.cholesky_solve(b.to(torch.float64).unsqueeze(1), factor).squeeze(1)
        status = "solved (positive definite)"
    else:
        solution = torch.linalg.solve(matrix, b.to(torch.float64))
        status = "solved (indefinite: the result is a saddle point, not a minimiser of the quadratic)"
    solution = solution.to(b.dtype)
    residual = relative_residual(operator, solution, b)
    return SolverResult(
        solution,
        "direct",
        operator.dim,
        [residual],
        [operator.dim],
        True,
        status,
        time.perf_counter() - start,
        {"min_eigenvalue": float(eigenvalues[0]), "max_eigenvalue": float(eigenvalues[-1])},
    )


def solve_cg(
    operator: LinearOperator,
    b: Tensor,
    tol: float = 1e-6,
    max_iters: int = 100,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[int, float], None] | None = None,
    diverge_after: int | None = None,
) -> SolverResult:
    """(Preconditioned) conjugate gradient from v₀ = 0 until ‖r‖/‖b‖ ≤ tol.

    Stops with ``status`` naming the problem if it meets a direction with pᵀAp ≤ 0 (A not positive
    definite: use the Gauss–Newton curvature or more damping); the iterate so far is returned.
    With ``diverge_after = k`` it also stops, with a status starting "diverged", when the residual has
    risen in k consecutive iterations to more than twice its best value (A nearly singular or
    indefinite in effect: more damping).
    """
    start = time.perf_counter()
    norm_b = float(b.norm())
    x = torch.zeros_like(b)
    if norm_b == 0:
        return SolverResult(x, "cg", 0, [0.0], [0], True, "b = 0", time.perf_counter() - start)
    r = b.clone()
    z = preconditioner(r) if preconditioner else r
    p = z.clone()
    rz = float(r @ z)
    residuals, at = [1.0], [0]
    status, converged, iteration, rises = f"max_iters={max_iters} reached", False, 0, 0
    for iteration in range(1, max_iters + 1):
        ap = operator.matvec(p)
        _check_finite(ap, f"the curvature product at cg iteration {iteration}")
        curvature = float(p @ ap)
        if curvature <= 0:
            status = (
                f"non-positive curvature pᵀAp = {curvature:.3e} at iteration {iteration}: the operator is not "
                "positive definite (use the gauss-newton curvature or a larger damping)"
            )
            iteration -= 1
            break
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        residuals.append(float(r.norm()) / norm_b)
        at.append(iteration)
        if callback:
            callback(iteration, residuals[-1])
        if residuals[-1] <= tol:
            status, converged = "converged", True
            break
        rises = rises + 1 if residuals[-1] > residuals[-2] else 0
        if diverge_after and rises >= diverge_after and residuals[-1] > 2.0 * min(residuals):
            status = (
                f"diverged: the residual rose in {rises} consecutive iterations, to {residuals[-1]:.3e} "
                f"(best {min(residuals):.3e}) at iteration {iteration}"
            )
            break
        z = preconditioner(r) if preconditioner else r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return SolverResult(x, "cg", iteration, residuals, at, converged, status, time.perf_counter() - start)


def estimate_largest_eigenvalue(
    operator: LinearOperator, dtype: torch.dtype, iterations: int = POWER_ITERATIONS, seed: int = 0
) -> float:
    """Power-iteration estimate of the largest |eigenvalue| of A (vectors of ``dtype``)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(operator.dim, generator=generator, dtype=torch.float64)
    estimate = 0.0
    for _ in range(iterations):
        vector = vector / vector.norm()
        product = operator.matvec(vector.to(dtype)).to(torch.float64)
        estimate = float(vector @ product)
        vector = product
    return abs(estimate)


def _stochastic_descent(
    name: str,
    operator: StochasticOperator,
    b: Tensor,
    step: Callable[[LinearOperator, float], Tensor],
    restart: Callable[[Tensor], None],
    lr: float,
    probe: LinearOperator,
    max_iters: int,
    tol: float,
    check_every: int,
    patience: int,
    max_decays: int,
    seed: int,
    details: dict[str, Any],
    callback: Callable[[int, float], None] | None = None,
) -> SolverResult:
    """The loop shared by the stochastic solvers, with a reduce-on-plateau step-size schedule.

    ``step(A_B, lr)`` advances the iterate with a fresh mini-batch operator and returns it. Every
    ``check_every`` steps the relative residual on the fixed ``probe`` is recorded; after ``patience``
    checks without improvement (doubled after each halving) the step size is halved and the iterate reset to the best one
    (``restart``); after ``max_decays`` halvings, or at ``tol``, the loop stops. Both the last iterate and
    the Polyak–Ruppert average of the iterates since the last restart are checked (averaging cancels
    most of the mini-batch noise on a quadratic); the best of all checked points is returned, and
    ``residuals`` records the best residual so far at each check.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    residuals, at = [1.0], [0]
    best_residual, best, best_step = math.inf, torch.zeros_like(b), 0
    stale, decays = 0, 0
    status, iteration = f"max_iters={max_iters} reached", 0
    average, averaged = torch.zeros_like(b), 0
    for iteration in range(1, max_iters + 1):
        current = step(operator.sample(generator), lr)
        averaged += 1
        average += (current - average) / averaged
        if iteration % check_every and iteration != max_iters:
            continue
        improved = False
        for candidate in (current, average):
            residual = relative_residual(probe, candidate, b)
            if not math.isfinite(residual):
                raise NumericalError(f"{name} diverged to NaN/Inf at step {iteration} (lower the step size)")
            if residual < best_residual:
                best_residual, best, best_step, improved = residual, candidate.clone(), iteration, True
        residuals.append(best_residual)
        at.append(iteration)
        if callback:
            callback(iteration, best_residual)
        stale = 0 if improved else stale + 1
        if best_residual <= tol:
            status = "converged"
            break
        if stale >= patience * 2**decays:  # a smaller step needs proportionally longer to show progress
            if decays == max_decays:
                status = f"stopped: probe residual stalled after {decays} step-size halvings"
                break
            decays, stale, lr = decays + 1, 0, lr / 2
            restart(best)
            average, averaged = best.clone(), 1
    return SolverResult(
        best,
        name,
        iteration,
        residuals,
        at,
        best_residual <= tol,
        status,
        time.perf_counter() - start,
        {**details, "best_step": best_step, "step_size_halvings": decays, "final_step_size": lr},
    )


def solve_lissa(
    operator: StochasticOperator,
    b: Tensor,
    scale: float | None = None,
    max_iters: int = 1000,
    tol: float = 1e-3,
    check_every: int = CHECK_EVERY,
    patience: int = 5,
    max_decays: int = 8,
    probe: LinearOperator | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> SolverResult:
    """LiSSA, the stochastic Neumann series u ← b + (I − A_B / s) u with v = u / s, i.e. in v:
    v ← v − (A_B v − b) / s, from v₀ = 0.

    ``scale`` s must exceed λ_max(A) for convergence; by default 1.2 × a power-iteration estimate on the
    probe operator. On a plateau of the probe residual s is doubled (the step halved).
    """
    probe = probe or operator
    if scale is None:
        scale = 1.2 * estimate_largest_eigenvalue(probe, b.dtype)
    state = {"v": torch.zeros_like(b)}

    def step(batch_operator: LinearOperator, lr: float) -> Tensor:
        state["v"] = state["v"] - lr * (batch_operator.matvec(state["v"]) - b)
        return state["v"]

    def restart(best: Tensor) -> None:
        state["v"] = best.clone()

    return _stochastic_descent(
        "lissa", operator, b, step, restart, 1.0 / scale, probe, max_iters, tol, check_every, patience,
        max_decays, seed, {"scale": scale}, callback,
    )


def solve_sgd(
    operator: StochasticOperator,
    b: Tensor,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    max_iters: int = 1000,
    tol: float = 1e-3,
    check_every: int = CHECK_EVERY,
    patience: int = 5,
    max_decays: int = 8,
    probe: LinearOperator | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> SolverResult:
    """The finite-sum QP min_v ½ vᵀAv − bᵀv by mini-batch stochastic optimisation, from v₀ = 0.

    Each step sets the gradient to the exact stochastic gradient A_B v − b (A_B = ``operator.sample()``,
    λI included), or P (A_B v − b) with a symmetric positive definite ``preconditioner`` P ≈ A⁻¹ (a
    curvature cache), and takes an SGD-with-momentum or Adam step. Default step size: (1 − momentum) /
    λ_max for SGD (λ_max of A, or of PA when preconditioned, estimated on the probe: the stable step of
    heavy-ball momentum), and 0.1 · max|b| / λ_max for Adam. Halved on plateaus of the probe residual
    (see ``_stochastic_descent``).
    """
    probe = probe or operator
    top = estimate_largest_eigenvalue(_PreconditionedOperator(probe, preconditioner) if preconditioner else probe, b.dtype)
    if optimizer not in ("sgd", "adam"):
        raise ConfigError("optimizer", f"unknown optimizer {optimizer!r} (expected 'sgd' or 'adam')")
    if lr is None:
        lr = (1.0 - momentum) / top if optimizer == "sgd" else 0.1 * float(b.abs().max()) / max(top, 1e-30)
    v = torch.zeros_like(b, requires_grad=True)

    def make_optimizer(step_size: float) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD([v], lr=step_size, momentum=momentum)
        return torch.optim.Adam([v], lr=step_size)

    state: dict[str, Any] = {"opt": make_optimizer(lr), "lr": lr}

    def step(batch_operator: LinearOperator, step_size: float) -> Tensor:
        if step_size != state["lr"]:
            state["opt"], state["lr"] = make_optimizer(step_size), step_size
        with torch.no_grad():
            gradient = batch_operator.matvec(v.detach()) - b
            v.grad = preconditioner(gradient) if preconditioner else gradient
        state["opt"].step()
        return v.detach()

    def restart(best: Tensor) -> None:
        with torch.no_grad():
            v.copy_(best)

    return _stochastic_descent(
        "sgd", operator, b, step, restart, lr, probe, max_iters, tol, check_every, patience, max_decays, seed,
        {"optimizer": optimizer, "initial_step_size": lr, "momentum": momentum, "lambda_max": top,
         "preconditioned": preconditioner is not None}, callback,
    )


@dataclass
class _PreconditionedOperator:
    """x ↦ P A x: its eigenvalues are those of P^½ A P^½ (real, positive for SPD P and A), whose largest
    sets the stable step of preconditioned gradient descent."""

    operator: LinearOperator
    preconditioner: Callable[[Tensor], Tensor]

    @property
    def dim(self) -> int:
        return self.operator.dim

    def matvec(self, vector: Tensor) -> Tensor:
        return self.preconditioner(self.operator.matvec(vector))


SOLVERS: dict[str, Callable[..., SolverResult]] = {  # the names of SolverName
    "direct": solve_direct,
    "cg": solve_cg,
    "lissa": solve_lissa,
    "sgd": solve_sgd,
}


def solve(name: str, operator: Any, b: Tensor, **options: Any) -> SolverResult:
    """Dispatch to a solver by name; ``options`` are that solver's keyword arguments."""
    if name not in SOLVERS:
        raise ConfigError("solver", f"unknown solver {name!r} (expected one of: {', '.join(SOLVERS)})")
    _check_finite(b, "the right-hand side b")
    result = SOLVERS[name](operator, b, **options)
    _check_finite(result.solution, f"the {name} solution v")
    return result
