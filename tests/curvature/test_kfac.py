"""K-FAC (``llmeraser.curvature.kfac``): the Kronecker algebra, the fitted factors, their quality against the exact
solve as the preconditioner of cg and sgd and used directly, and their cache's round trip with its hash checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature import CachedInverse, load_cache, save_cache
from llmeraser.curvature.kfac import KroneckerFactors, fit_kfac
from llmeraser.data import TokenizationConfig, tokenize_examples
from llmeraser.eraser import erase
from llmeraser.errors import InputError
from llmeraser.requests import CorrectResponse, Remove
from llmeraser.train import TrainConfig, train_adapter

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
RECIPE = TrainConfig(epochs=40, lr=2e-2, batch_size=8, weight_decay=0.1)


def random_spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T / n


def test_inverse_product_is_the_damped_kronecker_inverse():
    a, g = random_spd(3, 0), random_spd(4, 1)
    a_values, a_vectors = torch.linalg.eigh(a)
    g_values, g_vectors = torch.linalg.eigh(g)
    factor = KroneckerFactors(a_vectors, a_values, g_vectors, g_values)
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # vec(G V A) = (G ⊗ A) vec(V) for row-major vec; solve the explicit system
    explicit = torch.kron(g, a) + 0.3 * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(explicit, v.reshape(-1)).reshape(4, 3)
    assert torch.allclose(factor.inverse_product(v, 0.3), expected, atol=1e-12)
    assert torch.allclose(factor.product(v), (torch.kron(g, a) @ v.reshape(-1)).reshape(4, 3), atol=1e-12)


def trained_with_kfac():
    """The tiny model trained on 24 toy examples (q, v, up, down LoRA, r=4) and its K-FAC factors:
    (model, tokenizer, train, factors)."""
    model, tokenizer = tiny_lora_model(target_modules=TARGETS, r=4)
    train = toy_examples(24, seed=3)
    train_adapter(model, tokenizer, train, RECIPE)
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, train, TokenizationConfig(max_length=256))
    factors = fit_kfac(model, params, items, tokenizer.pad_token_id, batch_size=8)
    return model, tokenizer, train, factors


@pytest.fixture(scope="module")
def trained():
    return trained_with_kfac()


REQUESTS = [Remove("ex1"), CorrectResponse("ex4", " Maybe")]
SETTINGS = dict(solver="cg", damping=1e-3, weight_decay=0.1, tol=1e-9, max_iters=200)


def test_factors_cover_every_lora_weight_and_are_psd(trained):
    model, _, _, factors = trained
    params = AdapterParameters.of(model)
    assert set(factors) == set(params.names)
    for factor in factors.values():
        assert (factor.a_values >= 0).all() and (factor.g_values >= 0).all()
    inverse = CachedInverse(factors, params, shift=0.1)
    v = torch.randn(params.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float(v @ inverse(v)) > 0  # (K + λI)⁻¹ is positive definite


def test_preconditioned_cg_reaches_the_exact_solution(trained):
    model, tokenizer, train, factors = trained
    exact = erase(model, tokenizer, train, REQUESTS, **SETTINGS)
    preconditioned = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, **SETTINGS)
    assert preconditioned.solver.details["curvature_cache"] == "kfac preconditioner"
    assert float((preconditioned.update - exact.update).norm() / exact.update.norm()) < 1e-6


def test_preconditioned_sgd_approaches_the_exact_solution(trained):
    """The cache as the preconditioner of the stochastic solver (mini-batches of the exact operator)."""
    model, tokenizer, train, factors = trained
    exact = erase(model, tokenizer, train, REQUESTS, **SETTINGS)
    settings = {**SETTINGS, "solver": "sgd", "tol": 1e-3, "max_iters": 400, "batch_size": 4}
    preconditioned = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, **settings)
    assert preconditioned.solver.details["curvature_cache"] == "kfac preconditioner"
    assert preconditioned.solver.details["preconditioned"]
    assert float((preconditioned.update - exact.update).norm() / exact.update.norm()) < 5e-2, preconditioned.solver.summary()


def test_direct_kfac_update_is_close_to_the_exact_one(trained):
    """Measured: cosine 0.97, relative residual 0.29 against the exact operator on this problem."""
    model, tokenizer, train, factors = trained
    exact = erase(model, tokenizer, train, REQUESTS, **SETTINGS)
    direct = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, curvature_use="direct", **SETTINGS)
    cosine = float(torch.nn.functional.cosine_similarity(direct.update, exact.update, dim=0))
    assert cosine >= 0.9
    assert direct.solver.iterations == 0 and direct.solver.final_residual < 0.5


def test_saved_factors_round_trip_and_mismatches_are_refused(trained, tmp_path):
    _, _, _, factors = trained
    meta = {"model_fingerprint": "m", "adapter_sha256": "a", "data_sha256": "d"}
    save_cache(factors, tmp_path / "curv", meta)
    loaded, _ = load_cache(tmp_path / "curv", meta)
    name = next(iter(factors))
    assert torch.equal(loaded[name].g_vectors, factors[name].g_vectors)
    with pytest.raises(InputError, match="different adapter"):
        load_cache(tmp_path / "curv", {**meta, "adapter_sha256": "other"})
