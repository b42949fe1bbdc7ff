"""Solvers of (H + λI) v = b against a dense direct solve: random SPD problems and the tiny model.

Tolerances: ``cg`` is exact up to its residual tolerance (relative error ≤ 1e-5 against ``direct``);
the stochastic solvers (``lissa``, ``sgd`` with SGD-momentum or Adam) reach ≤ 1e-2 on well-conditioned
(κ ≈ 10-20) finite sums with their default schedules.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import exact_float64_llama, one_thread, perturbed_model, toy_examples

from llmeraser.curvature import CurvatureOperator
from llmeraser.data import TokenizationConfig, tokenize_examples
from llmeraser.errors import NumericalError
from llmeraser.gradients import summed_gradient
from llmeraser.solvers import (
    DenseOperator,
    FiniteSumDenseOperator,
    dense_matrix,
    estimate_largest_eigenvalue,
    relative_residual,
    solve,
    solve_cg,
    solve_direct,
)

STOCHASTIC = [("lissa", {}), ("sgd", {"optimizer": "sgd"}), ("sgd", {"optimizer": "adam"})]
STOCHASTIC_IDS = ["lissa", "sgd-momentum", "sgd-adam"]


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def spd(p, cond, seed):
    """A random symmetric positive definite (p, p) matrix with eigenvalues log-spaced in [1, cond]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(cond), p, dtype=torch.float64)
    matrix = (q * eigenvalues) @ q.T
    return 0.5 * (matrix + matrix.T)


def vector(p, seed):
    return torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def finite_sum(p=20, n=8, cond=10.0, spread=0.3, seed=0):
    """n symmetric terms scattered around a common SPD mean (their average is exactly that mean)."""
    generator = torch.Generator().manual_seed(seed)
    base = spd(p, cond, seed)
    noise = torch.randn(n, p, p, generator=generator, dtype=torch.float64) * spread / p**0.5
    terms = base + 0.5 * (noise + noise.transpose(1, 2))
    return terms - terms.mean(dim=0) + base


# --- dense problems --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [10.0, 1000.0])
def test_cg_agrees_with_direct(cond):
    matrix, b = spd(30, cond, seed=1), vector(30, seed=2)
    direct = solve("direct", DenseOperator(matrix), b)
    cg = solve("cg", DenseOperator(matrix), b, tol=1e-10, max_iters=200)
    assert direct.status.startswith("solved (positive definite)")
    assert direct.details["min_eigenvalue"] == pytest.approx(1.0, rel=1e-8)
    assert direct.details["max_eigenvalue"] == pytest.approx(cond, rel=1e-8)
    assert relative_error(direct.solution, torch.linalg.solve(matrix, b)) < 1e-10
    assert cg.converged and cg.status == "converged"
    assert relative_error(cg.solution, direct.solution) < 1e-5


def test_cg_with_a_jacobi_preconditioner():
    scales = torch.logspace(0, 2, 30, dtype=torch.float64)
    matrix = scales[:, None] * spd(30, 5.0, seed=3) * scales[None, :]  # badly scaled, well conditioned after Jacobi
    b = vector(30, seed=4)
    diagonal = torch.diagonal(matrix).clone()
    plain = solve_cg(DenseOperator(matrix), b, tol=1e-10, max_iters=300)
    jacobi = solve_cg(DenseOperator(matrix), b, tol=1e-10, max_iters=300, preconditioner=lambda r: r / diagonal)
    assert jacobi.converged
    assert relative_error(jacobi.solution, torch.linalg.solve(matrix, b)) < 1e-5
    assert jacobi.iterations < plain.iterations


def test_cg_residual_history_is_recorded_and_decreasing():
    matrix, b = spd(30, 10.0, seed=5), vector(30, seed=6)
    seen = []
    result = solve_cg(DenseOperator(matrix), b, tol=1e-10, max_iters=200, callback=lambda i, r: seen.append((i, r)))
    assert result.converged and result.iterations <= 30  # CG terminates in at most p steps (up to rounding)
    assert result.residuals[0] == 1.0 and result.iterations_at[0] == 0
    assert result.iterations_at == list(range(result.iterations + 1))
    assert seen == list(zip(result.iterations_at[1:], result.residuals[1:]))
    # Well conditioned: the residual norm falls at every step (not guaranteed for CG in general).
    assert all(later < earlier for earlier, later in zip(result.residuals, result.residuals[1:]))
    assert result.final_residual <= 1e-10
    # The recorded (recurrence) residual is the true one.
    assert abs(relative_residual(DenseOperator(matrix), result.solution, b) - result.final_residual) < 1e-12
    summary = result.summary()
    assert summary["residual_history"] == result.residuals and summary["converged"] is True


def test_cg_stops_on_non_positive_curvature():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0, -1.0, -2.0], dtype=torch.float64))
    b = torch.ones(5, dtype=torch.float64)
    result = solve_cg(DenseOperator(matrix), b, tol=1e-10, max_iters=50)
    assert not result.converged
    assert "non-positive curvature" in result.status
    assert "not positive definite" in result.status
    assert result.iterations < 5


def test_cg_with_zero_rhs():
    result = solve_cg(DenseOperator(spd(5, 10.0, seed=0)), torch.zeros(5, dtype=torch.float64))
    assert result.converged and torch.equal(result.solution, torch.zeros(5, dtype=torch.float64))


def test_direct_solves_an_indefinite_system_and_says_so():
    matrix = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    result = solve_direct(DenseOperator(matrix), b)
    assert "indefinite" in result.status
    assert result.details["min_eigenvalue"] == pytest.approx(-1.0)
    assert relative_error(result.solution, torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)) < 1e-12


def test_direct_refuses_large_problems():
    operator = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"10×10 matrix; it is limited to 5 parameters"):
        solve("direct", operator, torch.ones(10, dtype=torch.float64), max_dim=5)
    assert solve("direct", operator, torch.ones(10, dtype=torch.float64), max_dim=10).converged


def test_solve_rejects_unknown_names_and_non_finite_rhs():
    operator = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown solver 'newton' \(expected one of: direct, cg, lissa, sgd\)"):
        solve("newton", operator, torch.ones(3, dtype=torch.float64))
    for bad in (math.nan, math.inf):
        b = torch.tensor([1.0, bad, 0.0], dtype=torch.float64)
        with pytest.raises(NumericalError, match="right-hand side b contains NaN or Inf"):
            solve("cg", operator, b)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        solve("sgd", operator, torch.ones(3, dtype=torch.float64), optimizer="rmsprop")


def test_cg_raises_on_nan_products():
    class Broken:
        dim = 3

        def matvec(self, v):
            return torch.full_like(v, math.nan)

    with pytest.raises(NumericalError, match="cg iteration 1"):
        solve("cg", Broken(), torch.ones(3, dtype=torch.float64))


def test_dense_matrix_without_matmat():
    matrix = spd(7, 10.0, seed=8)
    assert torch.equal(dense_matrix(DenseOperator(matrix), torch.float64, chunk_size=3), matrix)


def test_largest_eigenvalue_estimate():
    matrix = spd(20, 50.0, seed=9)
    assert estimate_largest_eigenvalue(DenseOperator(matrix), torch.float64, iterations=200) == pytest.approx(50.0, rel=1e-3)


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_stochastic_solvers_on_a_deterministic_operator(name, options):
    """Without mini-batch noise (DenseOperator samples to itself) they converge like gradient descent."""
    matrix, b = spd(20, 10.0, seed=10), vector(20, seed=11)
    result = solve(name, DenseOperator(matrix), b, tol=1e-8, max_iters=5000, **options)
    assert result.converged, result.status
    assert relative_error(result.solution, torch.linalg.solve(matrix, b)) < 1e-6


def test_preconditioned_sgd_solves_an_ill_conditioned_finite_sum_that_plain_sgd_does_not():
    """κ = 1000: with the same step budget, plain SGD-momentum is far from the solution; preconditioned by an
    approximate inverse (the exact one with ~20 % relative noise in its spectrum, as a curvature cache would
    give) it reaches it. The preconditioned step is set by λ_max(PA) ≈ 1, not λ_max(A) = 1000."""
    terms = finite_sum(cond=1000.0, spread=0.3, seed=4)
    operator = FiniteSumDenseOperator(terms, shift=0.0, batch_size=2)
    b = vector(20, seed=14)
    direct = solve("direct", operator, b).solution
    noise = torch.randn(20, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.2 / 20**0.5
    values, vectors = torch.linalg.eigh(terms.mean(0))
    inverse_root = (vectors * values.rsqrt()) @ vectors.T  # P = M^-½ (I + E) M^-½: SPD, PM has eigenvalues 1 ± ~0.2
    approximate = inverse_root @ (torch.eye(20, dtype=torch.float64) + 0.5 * (noise + noise.T)) @ inverse_root
    assert torch.linalg.eigvalsh(approximate).min() > 0
    options = dict(optimizer="sgd", tol=1e-4, max_iters=600)
    plain = solve("sgd", operator, b, **options)
    preconditioned = solve("sgd", operator, b, preconditioner=lambda r: approximate @ r, **options)
    assert relative_error(plain.solution, direct) > 0.1, plain.summary()
    assert relative_error(preconditioned.solution, direct) < 1e-2, preconditioned.summary()
    assert preconditioned.details["preconditioned"] and preconditioned.details["lambda_max"] < 10


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_stochastic_solvers_on_a_finite_sum(name, options):
    terms, damping = finite_sum(seed=0), 0.1
    operator = FiniteSumDenseOperator(terms, shift=damping, batch_size=2)
    b = vector(20, seed=12)
    direct = solve("direct", operator, b)
    result = solve(name, operator, b, tol=1e-4, max_iters=5000, **options)
    assert relative_error(result.solution, direct.solution) < 1e-2, result.summary()
    # The history is the best probe residual so far: it starts at 1 and never rises.
    assert result.residuals[0] == 1.0
    assert all(later <= earlier for earlier, later in zip(result.residuals, result.residuals[1:]))
    assert result.final_residual == pytest.approx(relative_residual(operator, result.solution, b), rel=1e-10)


def test_finite_sum_sample_is_an_unbiased_average():
    terms = finite_sum(p=6, n=4, seed=1)
    operator = FiniteSumDenseOperator(terms, shift=0.5, batch_size=2)
    v = vector(6, seed=13)
    assert relative_error(operator.matvec(v), terms.mean(0) @ v + 0.5 * v) < 1e-14
    generator = torch.Generator().manual_seed(0)
    samples = [operator.sample(generator) for _ in range(3000)]
    assert all(s.terms.shape == (2, 6, 6) and s.shift == 0.5 for s in samples)
    average = sum(s.matvec(v) for s in samples) / len(samples)
    assert relative_error(average, operator.matvec(v)) < 0.03  # Monte Carlo, 3000 draws


# --- the tiny model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_problem():
    """Gauss–Newton of the tiny model (v_proj LoRA r=1, 96 parameters, 4 examples), damped to κ ≈ 20,
    with b the removal right-hand side of example 0; plus its per-example explicit matrices."""
    with exact_float64_llama(), one_thread():
        model, tokenizer, params = perturbed_model(("v_proj",), r=1, seed=1)
        items = tokenize_examples(tokenizer, toy_examples(4, seed=11), TokenizationConfig(max_length=64))
        undamped = CurvatureOperator(model, params, items, tokenizer.pad_token_id, kind="gauss-newton")
        eye = torch.eye(params.dim, dtype=torch.float64)
        terms = torch.stack([undamped.restrict([i]).matmat(eye) for i in range(len(items))])
        damping = 0.05 * float(torch.linalg.eigvalsh(terms.mean(0))[-1])
        operator = CurvatureOperator(
            model, params, items, tokenizer.pad_token_id, kind="gauss-newton", damping=damping, batch_size=2
        )
        b = summed_gradient(model, params, items[:1], tokenizer.pad_token_id) / (len(items) - 1)
        yield operator, terms, damping, b


def test_model_cg_agrees_with_direct(model_problem):
    operator, _, _, b = model_problem
    with exact_float64_llama(), one_thread():
        direct = solve("direct", operator, b)
        cg = solve("cg", operator, b, tol=1e-10, max_iters=200)
    assert direct.status.startswith("solved (positive definite)")
    assert direct.final_residual < 1e-10
    assert cg.converged, cg.status
    assert relative_error(cg.solution, direct.solution) < 1e-5
    # Removal: the first-order change of the removed example's loss, ∇ℓᵀ v, is positive.
    assert float(b @ cg.solution) > 0


def test_model_per_example_terms_make_up_the_operator(model_problem):
    operator, terms, damping, b = model_problem
    finite = FiniteSumDenseOperator(terms, shift=damping, batch_size=2)
    with exact_float64_llama(), one_thread():
        live = operator.matvec(b)
    assert relative_error(finite.matvec(b), live) < 1e-10


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_model_stochastic_solvers_agree_with_direct(model_problem, name, options):
    _, terms, damping, b = model_problem
    finite = FiniteSumDenseOperator(terms, shift=damping, batch_size=2)
    reference = solve("direct", finite, b).solution
    result = solve(name, finite, b, tol=1e-4, max_iters=5000, **options)
    assert relative_error(result.solution, reference) < 1e-2, result.summary()
