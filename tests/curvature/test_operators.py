"""Curvature operators against independent references on the tiny model (float64).

References: central finite differences of the gradient (Hessian), an explicit Jᵀ Λ J from
``torch.autograd.functional.jacobian`` (Gauss–Newton), and the convex ``lm_head`` case where the
logits are linear in θ, so Hessian == Gauss–Newton exactly.

Transformers' LLaMA computes RMSNorm and the attention softmax in float32 even for a float64 model,
which caps every comparison at ~1e-8 (finite differences of the gradient at ~1e-5). ``exact_float64_llama``
swaps in the same two functions computed in the input dtype for the duration of a test module;
``test_exact_float64_patch_is_the_same_model`` checks that the patch changes nothing but rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    exact_float64_llama,
    one_thread,
    perturbed_model,
    toy_examples,
)
from torch.func import functional_call

from llmeraser.curvature import CurvatureOperator
from llmeraser.data import (
    TokenizationConfig,
    collate,
    example_losses,
    tokenize_examples,
)
from llmeraser.gradients import summed_gradient
from llmeraser.solvers import dense_matrix


@pytest.fixture(scope="module", autouse=True)
def float64_llama():
    with exact_float64_llama(), one_thread():
        yield


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def random_vectors(k, dim, seed=0):
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def problem():
    """q,v LoRA r=1 (224 parameters) at a random θ, 3 examples of different response lengths."""
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj"), r=1)
    examples = toy_examples(3, seed=2)
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=64))
    assert len({len(i.input_ids) - i.prompt_length for i in items}) > 1  # different T_i: weights matter
    return model, tokenizer, params, items


def operator(problem, **options):
    model, tokenizer, params, items = problem
    return CurvatureOperator(model, params, items, tokenizer.pad_token_id, **options)


def _originals():
    from transformers.models.llama import modeling_llama

    return [
        (modeling_llama.LlamaRMSNorm, "forward", modeling_llama.LlamaRMSNorm.forward),
        (modeling_llama, "eager_attention_forward", modeling_llama.eager_attention_forward),
    ]


_ORIGINALS = _originals()  # captured at import (collection), before any fixture patches them


def test_exact_float64_patch_is_the_same_model(problem):
    model, tokenizer, _, items = problem
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        patched = example_losses(model, batch)
        with pytest.MonkeyPatch.context() as undo:
            for obj, name, value in _ORIGINALS:
                undo.setattr(obj, name, value)
            reference = example_losses(model, batch)
    assert patched.dtype == torch.float64
    assert 0 < relative_error(patched, reference) < 1e-6  # same model; only float32 rounding removed


# --- Hessian ---------------------------------------------------------------------------------------------


def test_hessian_vector_product_matches_finite_differences(problem):
    model, tokenizer, params, items = problem
    n = len(items)
    theta = params.flat()
    v = random_vectors(1, params.dim, seed=1)[0]
    hv = operator(problem, kind="hessian").matvec(v)

    def gradient_at(point):
        params.assign(point)
        try:
            return summed_gradient(model, params, items, tokenizer.pad_token_id) / n
        finally:
            params.assign(theta)

    eps = 1e-5
    finite_difference = (gradient_at(theta + eps * v) - gradient_at(theta - eps * v)) / (2 * eps)
    assert torch.equal(params.flat(), theta)
    assert relative_error(hv, finite_difference) < 1e-6


def test_batched_rows_equal_single_products(problem):
    vectors = random_vectors(3, problem[2].dim, seed=2)
    for kind in ("hessian", "gauss-newton"):
        op = operator(problem, kind=kind)
        rows = op.matmat(vectors)
        singles = torch.stack([op.matvec(v) for v in vectors])
        assert relative_error(rows, singles) < 1e-12, kind


@pytest.mark.parametrize("kind", ["hessian", "gauss-newton"])
def test_chunking_does_not_change_the_operator(problem, kind):
    """Per-example normalisation: padded batches of any size give the same (1/N) Σ_i products."""
    v = random_vectors(1, problem[2].dim, seed=3)[0]
    whole = operator(problem, kind=kind, batch_size=8).matvec(v)
    chunked = operator(problem, kind=kind, batch_size=2).matvec(v)
    assert relative_error(chunked, whole) < 1e-10


# --- Gauss–Newton ----------------------------------------------------------------------------------------


def explicit_gauss_newton(model, tokenizer, params, items):
    """(1/N) Σ_i (1/T_i) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over the response-predicting positions t."""
    theta = params.flat()
    total = torch.zeros(params.dim, params.dim, dtype=torch.float64)
    for item in items:
        batch = collate([item], tokenizer.pad_token_id)
        positions = torch.arange(item.prompt_length - 1, len(item.input_ids) - 1)

        def logits_of(flat, batch=batch, positions=positions):
            # all positions' logits (no logits_to_keep: an independent reference); no KV cache under vmap
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            out = functional_call(model, params.as_dict(flat), args=(), kwargs=kwargs, strict=False)
            return out.logits[0, positions]

        jacobian = torch.autograd.functional.jacobian(logits_of, theta, vectorize=True, strategy="forward-mode")
        with torch.no_grad():
            probs = torch.softmax(logits_of(theta), dim=-1)  # (T, V)
        for t in range(len(positions)):
            p, j = probs[t], jacobian[t]  # (V,), (V, P)
            lam = torch.diag(p) - torch.outer(p, p)
            total += j.T @ lam @ j / len(positions)
    return total / len(items)


def test_gauss_newton_matches_explicit_jacobian_product(problem):
    model, tokenizer, params, items = problem
    explicit = explicit_gauss_newton(model, tokenizer, params, items)
    vectors = random_vectors(4, params.dim, seed=4)
    products = operator(problem, kind="gauss-newton").matmat(vectors)
    assert relative_error(products, vectors @ explicit) < 1e-9
    # And it is not the Hessian here (θ is not where the model is linear): the comparison can fail.
    hessian = operator(problem, kind="hessian").matmat(vectors)
    assert relative_error(hessian, products) > 1e-2


def test_gauss_newton_equals_hessian_on_the_convex_head():
    model, tokenizer, params = perturbed_model(("lm_head",), r=1, freeze_lora_a=True)
    assert all("lora_B" in name for name in params.names)
    items = tokenize_examples(tokenizer, toy_examples(3, seed=5), TokenizationConfig(max_length=64))
    vectors = random_vectors(3, params.dim, seed=5)
    gauss_newton = CurvatureOperator(model, params, items, tokenizer.pad_token_id, kind="gauss-newton").matmat(vectors)
    hessian = CurvatureOperator(model, params, items, tokenizer.pad_token_id, kind="hessian").matmat(vectors)
    assert relative_error(gauss_newton, hessian) < 1e-10


# --- explicit matrices -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_problem():
    """v_proj LoRA r=1 (96 parameters): cheap enough to form the Gauss–Newton matrix row by row."""
    model, tokenizer, params = perturbed_model(("v_proj",), r=1, seed=1)
    items = tokenize_examples(tokenizer, toy_examples(3, seed=6), TokenizationConfig(max_length=64))
    return model, tokenizer, params, items


@pytest.fixture(scope="module")
def small_matrices(small_problem):
    return {kind: dense_matrix(operator(small_problem, kind=kind), torch.float64) for kind in ("hessian", "gauss-newton")}


@pytest.mark.parametrize("kind", ["hessian", "gauss-newton"])
def test_dense_matrix_matches_matvec_and_is_symmetric(small_problem, small_matrices, kind):
    matrix = small_matrices[kind]
    assert matrix.shape == (96, 96)
    vectors = random_vectors(3, 96, seed=7)
    products = torch.stack([operator(small_problem, kind=kind).matvec(v) for v in vectors])
    assert relative_error(vectors @ matrix.T, products) < 1e-12
    assert float((matrix - matrix.T).norm() / matrix.norm()) < 1e-12


def test_gauss_newton_is_psd_and_hessian_differs(small_matrices):
    gauss_newton = small_matrices["gauss-newton"]
    eigenvalues = torch.linalg.eigvalsh(0.5 * (gauss_newton + gauss_newton.T))
    assert float(eigenvalues[0]) >= -1e-10
    assert float(eigenvalues[-1]) > 1e-3  # not trivially zero
    assert relative_error(small_matrices["hessian"], gauss_newton) > 1e-2


# --- damping, weight decay, sub-sampling -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hessian", "gauss-newton"])
def test_damping_and_weight_decay_add_a_multiple_of_identity(problem, kind):
    v = random_vectors(1, problem[2].dim, seed=8)[0]
    plain = operator(problem, kind=kind).matvec(v)
    shifted_op = operator(problem, kind=kind, damping=0.3, weight_decay=0.05)
    assert shifted_op.shift == pytest.approx(0.35)
    assert relative_error(shifted_op.matvec(v), plain + 0.35 * v) < 1e-12


def test_operator_rejects_bad_settings(problem):
    with pytest.raises(ValueError, match="unknown curvature 'fisher'"):
        operator(problem, kind="fisher")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        operator(problem, damping=-1.0)
    model, tokenizer, params, _ = problem
    with pytest.raises(ValueError, match="at least one example"):
        CurvatureOperator(model, params, [], tokenizer.pad_token_id)


def test_restrictions_over_a_partition_average_to_the_full_operator(problem):
    """Σ_B (|B|/N) C_B = C: the per-subset operators are normalised by their own size."""
    n = len(problem[3])
    v = random_vectors(1, problem[2].dim, seed=9)[0]
    full = operator(problem, kind="hessian", damping=0.1).matvec(v)
    partition = [[0, 2], [1]]
    combined = sum(len(part) / n * operator(problem, kind="hessian", damping=0.1).restrict(part).matvec(v) for part in partition)
    assert relative_error(combined, full) < 1e-12


def test_sample_is_an_unbiased_mini_batch(problem):
    op = operator(problem, kind="gauss-newton", damping=0.1, batch_size=2)
    v = random_vectors(1, op.dim, seed=10)[0]
    n = len(op.items)
    # sample() draws `batch_size` distinct examples uniformly: the average over all such subsets is C.
    subsets = list(itertools.combinations(range(n), 2))
    average = sum(op.restrict(list(s)).matvec(v) for s in subsets) / len(subsets)
    assert relative_error(average, op.matvec(v)) < 1e-12
    generator = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(20):
        sample = op.sample(generator)
        assert len(sample.items) == 2 and sample.damping == op.damping and sample.kind == op.kind
        ids = tuple(op.items.index(item) for item in sample.items)
        assert len(set(ids)) == 2
        drawn.add(tuple(sorted(ids)))
    assert drawn == set(subsets)  # every subset reachable
    # An operator no larger than a batch samples to itself.
    assert operator(problem, batch_size=8).sample(generator).items == op.items
