"""K-FAC curvature cache: the Kronecker algebra, its quality against the exact solve, preconditioned cg,
and the fit-curvature → erase --curvature-cache command line with its hash checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_lora_model, toy_examples
from llmeraser.data import TokenizationConfig, tokenize_examples, write_examples
from llmeraser.eraser import erase
from llmeraser.errors import InputError
from llmeraser.kfac import KfacInverse, KroneckerFactors, fit_kfac, load_kfac, save_kfac
from llmeraser.model import AdapterParameters
from llmeraser.requests import CorrectResponse, Remove
from llmeraser.train import TrainConfig, train_adapter

SCRIPT = Path(sys.executable).with_name("llmeraser")
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


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = tiny_lora_model(target_modules=TARGETS, r=4)
    train = toy_examples(24, seed=3)
    train_adapter(model, tokenizer, train, RECIPE)
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, train, TokenizationConfig(max_length=256))
    factors = fit_kfac(model, params, items, tokenizer.pad_token_id, batch_size=8)
    return model, tokenizer, train, factors


REQUESTS = [Remove("ex1"), CorrectResponse("ex4", " Maybe")]
SETTINGS = dict(solver="cg", damping=1e-3, weight_decay=0.1, tol=1e-9, max_iters=200)


def test_factors_cover_every_lora_weight_and_are_psd(trained):
    model, _, _, factors = trained
    params = AdapterParameters.of(model)
    assert set(factors) == set(params.names)
    for factor in factors.values():
        assert (factor.a_values >= 0).all() and (factor.g_values >= 0).all()
    inverse = KfacInverse(factors, params, shift=0.1)
    v = torch.randn(params.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float(v @ inverse(v)) > 0  # (K + λI)⁻¹ is positive definite


def test_preconditioned_cg_reaches_the_exact_solution(trained):
    model, tokenizer, train, factors = trained
    exact = erase(model, tokenizer, train, REQUESTS, **SETTINGS)
    preconditioned = erase(model, tokenizer, train, REQUESTS, kfac=factors, **SETTINGS)
    assert preconditioned.solver.details["curvature_cache"] == "kfac preconditioner"
    assert float((preconditioned.update - exact.update).norm() / exact.update.norm()) < 1e-6


def test_direct_kfac_update_is_close_to_the_exact_one(trained):
    """Measured: cosine 0.97, relative residual 0.29 against the exact operator on this problem."""
    model, tokenizer, train, factors = trained
    exact = erase(model, tokenizer, train, REQUESTS, **SETTINGS)
    direct = erase(model, tokenizer, train, REQUESTS, kfac=factors, curvature_use="direct", **SETTINGS)
    cosine = float(torch.nn.functional.cosine_similarity(direct.update, exact.update, dim=0))
    assert cosine >= 0.9
    assert direct.solver.iterations == 0 and direct.solver.final_residual < 0.5


def test_saved_factors_round_trip_and_mismatches_are_refused(trained, tmp_path):
    _, _, _, factors = trained
    meta = {"model_fingerprint": "m", "adapter_sha256": "a", "data_sha256": "d"}
    save_kfac(factors, tmp_path / "curv", meta)
    loaded, _ = load_kfac(tmp_path / "curv", meta)
    name = next(iter(factors))
    assert torch.equal(loaded[name].g_vectors, factors[name].g_vectors)
    with pytest.raises(InputError, match="different adapter"):
        load_kfac(tmp_path / "curv", {**meta, "adapter_sha256": "other"})


def test_fit_curvature_then_erase_with_the_cache(tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, toy_examples(12, seed=5))
    run = lambda *a: subprocess.run([str(SCRIPT), *a], capture_output=True, text=True, timeout=600)  # noqa: E731
    done = run("train", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "adapter"), "--lora-r", "2",
               "--epochs", "5", "--lr", "1e-2", "--weight-decay", "0.1")
    assert done.returncode == 0, done.stderr
    done = run("fit-curvature", "--adapter", str(tmp_path / "adapter"), "--data", str(data), "--out", str(tmp_path / "curv"))
    assert done.returncode == 0, done.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"op": "remove", "id": "ex2"}\n')
    done = run("erase", "--adapter", str(tmp_path / "adapter"), "--data", str(data), "--requests", str(requests),
               "--out", str(tmp_path / "erased"), "--curvature-cache", str(tmp_path / "curv"), "--curvature-use", "direct")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())
    assert report["solver"]["solver"] == "kfac" and report["solver"]["curvature_cache"] == "kfac direct"
    # a cache fitted for another adapter is refused
    done = run("train", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "other"), "--lora-r", "2",
               "--epochs", "5", "--lr", "1e-2", "--weight-decay", "0.1", "--seed", "1")
    assert done.returncode == 0, done.stderr
    done = run("erase", "--adapter", str(tmp_path / "other"), "--data", str(data), "--requests", str(requests),
               "--out", str(tmp_path / "x"), "--curvature-cache", str(tmp_path / "curv"))
    assert done.returncode == 3 and "fitted for a different" in done.stderr
    assert not (tmp_path / "x").exists()
