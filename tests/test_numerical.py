"""Numerical guards of ``erase``: NaN/Inf stop the run naming the stage (adapter, losses, gradients,
curvature, solve); a diverging or failing solve names the damping to try; ``auto_damping`` escalates λ
and records every attempt; cg detects a residual that keeps rising."""

from __future__ import annotations

import pytest
import torch
from conftest import one_thread, tiny_lora_model, toy_examples

import llmeraser.curvature.operators as curvature
import llmeraser.eraser as eraser
from llmeraser.adapter import AdapterParameters
from llmeraser.errors import NumericalError
from llmeraser.requests import CorrectResponse, Remove
from llmeraser.solvers import DenseOperator, SolverResult, solve_cg

TRAIN = toy_examples(8, seed=2)
REQUESTS = [Remove("ex1"), CorrectResponse("ex4", " Maybe")]


@pytest.fixture
def model():
    with one_thread():
        yield tiny_lora_model(r=2)


def fake_solver(fail_below: float, residual: float = 5.0):
    """A solve that 'diverges' while λ < ``fail_below`` and else calls the real one."""
    real = eraser.solve

    def solve(name, operator, b, **options):
        if operator.damping < fail_below:
            return SolverResult(torch.zeros_like(b), name, 7, [1.0, residual], [0, 7], False,
                                "diverged: the residual rose in 5 consecutive iterations", 0.0)
        return real(name, operator, b, **options)

    return solve


def test_a_diverging_solve_stops_and_names_the_damping_to_try(model, monkeypatch):
    monkeypatch.setattr(eraser, "solve", fake_solver(fail_below=1.0))
    peft_model, tokenizer = model
    with pytest.raises(NumericalError) as caught:
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS, damping=1e-3)
    assert caught.value.stage == "solve"
    assert str(caught.value).startswith("stage 'solve': cg diverged")
    assert "try a larger damping: `damping=0.01` (or `auto_damping=True`)" in str(caught.value)  # fields, not flags


def test_auto_damping_escalates_and_records_every_attempt(model, monkeypatch):
    monkeypatch.setattr(eraser, "solve", fake_solver(fail_below=0.05))
    peft_model, tokenizer = model
    theta = AdapterParameters.of(peft_model).flat()
    result = eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS, damping=1e-3, auto_damping=True)
    attempts = result.report["damping_attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "ok"]
    assert [a["damping"] for a in attempts] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert "diverged" in attempts[0]["error"]
    assert result.report["damping_used"] == pytest.approx(0.1)
    assert result.report["config"]["damping"] == 1e-3  # as requested; the λ used is reported beside it
    assert torch.equal(AdapterParameters.of(peft_model).flat(), theta)


def test_auto_damping_gives_up_after_the_attempt_limit(model, monkeypatch):
    monkeypatch.setattr(eraser, "solve", fake_solver(fail_below=1e9))
    peft_model, tokenizer = model
    with pytest.raises(NumericalError, match=r"auto-damping tried λ = 0.001, 0.01, 0.1 without success"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS, damping=1e-3, auto_damping=True, max_damping_attempts=3)


def test_a_result_worse_than_no_update_is_a_failure(model, monkeypatch):
    real = eraser.solve

    def worse(name, operator, b, **options):
        result = real(name, operator, b, **options)
        result.residuals[-1], result.converged, result.status = 3.0, False, "max_iters=50 reached"
        return result

    monkeypatch.setattr(eraser, "solve", worse)
    peft_model, tokenizer = model
    with pytest.raises(NumericalError, match=r"relative residual 3.000e\+00 > 1 \(worse than no update"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS, damping=1e-2)


def test_nan_in_adapter_weights_stops_at_stage_adapter(model):
    peft_model, tokenizer = model
    params = AdapterParameters.of(peft_model)
    theta = params.flat()
    theta[3] = float("nan")
    params.assign(theta)
    with pytest.raises(NumericalError, match="stage 'adapter'"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS)


def test_nan_in_the_frozen_model_stops_at_stage_losses(model):
    peft_model, tokenizer = model
    head = peft_model.get_output_embeddings() if hasattr(peft_model, "get_output_embeddings") else None
    head = head if head is not None else peft_model.base_model.model.lm_head
    with torch.no_grad():
        head.weight[5, 0] = float("inf")
        head.weight[6, 0] = -float("inf")
    with pytest.raises(NumericalError, match=r"stage 'losses': the loss of edited example \(as in the training set\) #0"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS)


def test_nan_in_curvature_products_stops_at_stage_curvature_and_is_not_retried(model, monkeypatch):
    calls = []

    def broken(model_, params, batch, vectors, scale):
        calls.append(1)
        return torch.full_like(vectors, float("nan"))

    monkeypatch.setitem(curvature._PRODUCTS, "gauss-newton", broken)
    peft_model, tokenizer = model
    with pytest.raises(NumericalError, match=r"stage 'curvature': the gauss-newton product over 7 examples"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS, auto_damping=True)
    assert len(calls) == 1  # one batch of one product; no retry with more damping


def test_nan_solution_is_reported_at_stage_solve(model, monkeypatch):
    def nan_solve(operator, b, **options):
        return SolverResult(torch.full_like(b, float("nan")), "cg", 1, [1.0], [0], False, "x", 0.0)

    from llmeraser import solvers

    monkeypatch.setitem(solvers.SOLVERS, "cg", nan_solve)  # solve() checks v after the solver returns
    peft_model, tokenizer = model
    with pytest.raises(NumericalError, match=r"stage 'solve': cg: the cg solution v contains NaN or Inf"):
        eraser.erase(peft_model, tokenizer, TRAIN, REQUESTS)


def test_cg_stops_when_the_residual_keeps_rising():
    # Slightly indefinite (3 eigenvalues in [-0.03, -0.01]; think: an exact Hessian away from a minimum, too
    # little damping): pᵀAp stays positive for a while but the residual climbs far above its best.
    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.cat([torch.linspace(0.05, 1, 27, dtype=torch.float64),
                             torch.tensor([-0.01, -0.02, -0.03], dtype=torch.float64)])
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    operator = DenseOperator(q @ torch.diag(eigenvalues) @ q.T)
    b = torch.randn(30, generator=generator, dtype=torch.float64)
    guarded = solve_cg(operator, b, tol=1e-12, max_iters=100, diverge_after=3)
    assert guarded.status.startswith("diverged: the residual rose in 3 consecutive iterations")
    assert guarded.iterations == 6 and guarded.residuals[-1] > 2 * min(guarded.residuals)
    assert all(later > earlier for earlier, later in zip(guarded.residuals[-4:], guarded.residuals[-3:]))
    plain = solve_cg(operator, b, tol=1e-12, max_iters=100)  # without the guard: on until pᵀAp ≤ 0
    assert not plain.status.startswith("diverged") and not plain.converged
    damped = solve_cg(DenseOperator(operator.matrix + 0.1 * torch.eye(30, dtype=torch.float64)), b, tol=1e-10,
                      max_iters=100, diverge_after=3)
    assert damped.converged  # the damping the message suggests (λ × 10 from 0.01) cures it
