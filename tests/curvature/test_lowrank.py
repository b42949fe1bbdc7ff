"""The exact low-rank Gauss–Newton factor (``llmeraser.curvature.lowrank``) against the operator's products."""

from __future__ import annotations

import pytest
import torch
from conftest import exact_float64_llama, one_thread, perturbed_model, toy_examples

from llmeraser.curvature import CurvatureOperator
from llmeraser.curvature.lowrank import low_rank_gauss_newton
from llmeraser.data import TokenizationConfig, tokenize_examples
from llmeraser.errors import ConfigError
from llmeraser.solvers import dense_matrix

WEIGHT_DECAY = 1e-3


@pytest.fixture(scope="module", autouse=True)
def float64_llama():
    with exact_float64_llama(), one_thread():
        yield


@pytest.fixture(scope="module")
def problem():
    """q,v LoRA r=1 (224 parameters) at a random θ, 2 examples (the exact factor: 259 rows per position)."""
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj"), r=1)
    items = tokenize_examples(tokenizer, toy_examples(2, seed=2), TokenizationConfig(max_length=64))
    return model, tokenizer, params, items


def vectors(k, dim, seed=0):
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_with_every_token_the_factor_is_the_gauss_newton_operator(problem):
    model, tokenizer, params, items = problem
    vocabulary = model.get_output_embeddings().weight.shape[0]
    factor = low_rank_gauss_newton(model, params, items, tokenizer.pad_token_id, top_k=vocabulary,
                                   weight_decay=WEIGHT_DECAY, batch_size=3, row_chunk=97)  # several chunks
    operator = CurvatureOperator(model, params, items, tokenizer.pad_token_id, "gauss-newton",
                                 weight_decay=WEIGHT_DECAY, batch_size=4)
    matrix = dense_matrix(operator, torch.float64)  # C + λ_wd I, one product per parameter
    assert factor.rows.shape[0] == vocabulary * sum(len(item.loss_positions()) for item in items)
    assert torch.allclose(factor.coverage, torch.ones_like(factor.coverage), atol=1e-12)
    for v in vectors(3, params.dim):
        exact = operator.matvec(v)
        assert float((factor.matvec(v) - exact).norm() / exact.norm()) < 1e-10
        assert float((factor.matvec(v, damping=0.05) - exact - 0.05 * v).norm() / exact.norm()) < 1e-10
    b = vectors(1, params.dim, seed=1)[0]
    identity = torch.eye(params.dim, dtype=torch.float64)
    for damping in (1e-3, 0.05, 1.0):  # one factorisation, every damping: equal to the dense solve
        reference = torch.linalg.solve(matrix + damping * identity, b)
        solution = factor.solve(b, damping)
        assert float((solution - reference).norm() / reference.norm()) < 1e-8, damping


def test_a_few_tokens_cover_most_of_the_curvature_and_the_coverage_says_how_much(problem):
    model, tokenizer, params, items = problem
    operator = CurvatureOperator(model, params, items, tokenizer.pad_token_id, "gauss-newton", batch_size=4)
    short, longer = (low_rank_gauss_newton(model, params, items, tokenizer.pad_token_id, top_k=k, weight_decay=0.0)
                     for k in (3, 30))
    positions = sum(len(item.loss_positions()) for item in items)
    assert short.rows.shape[0] == 3 * positions and short.coverage.shape == (positions,)
    assert bool((short.coverage > 0).all() and (short.coverage < longer.coverage).all() and (longer.coverage < 1).all())
    for v in vectors(3, params.dim, seed=2):  # the kept rows are subsets of the exact factor's: vᵀC_k v grows with k
        assert float(v @ short.matvec(v)) <= float(v @ longer.matvec(v)) <= float(v @ operator.matvec(v)) * (1 + 1e-10)
    with pytest.raises(ConfigError, match="GiB"):
        low_rank_gauss_newton(model, params, items * 10**5, tokenizer.pad_token_id, top_k=100, weight_decay=0.0)
    with pytest.raises(ValueError, match="damping"):
        short.solve(vectors(1, params.dim)[0], 0.0)
