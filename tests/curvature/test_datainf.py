"""DataInf (``llmeraser.curvature.datainf``): the closed form against Sherman–Morrison by hand and dense solves,
and the fitted per-example gradients with their cache's round trip and hash checks."""

from __future__ import annotations

import pytest
import torch
from conftest import exact_float64_llama, one_thread
from curvature.test_ekfac import one_lora_weight

from llmeraser.curvature import load_cache, save_cache
from llmeraser.curvature.datainf import DataInfLayer, datainf_damping, datainf_inverse_product, fit_datainf
from llmeraser.errors import InputError
from llmeraser.gradients import per_example_gradients


def test_datainf_closed_form_is_the_mean_of_sherman_morrison_inverses():
    """Exactly known gradients: the closed form = (1/n) Σ_i (g_i g_iᵀ + λI)⁻¹ v, each inverse by hand
    (Sherman–Morrison) and by a dense solve; one example: the exact damped inverse."""
    gradients = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    lam = 0.25
    by_hand = sum((v - (g @ v) / (lam + g @ g) * g) / lam for g in gradients) / len(gradients)
    dense_solves = sum(torch.linalg.solve(torch.outer(g, g) + lam * torch.eye(3, dtype=torch.float64), v)
                       for g in gradients) / len(gradients)
    closed = datainf_inverse_product(gradients, v, lam)
    assert torch.allclose(closed, by_hand, atol=1e-14) and torch.allclose(closed, dense_solves, atol=1e-12)
    exact = torch.linalg.solve(torch.outer(gradients[0], gradients[0]) + lam * torch.eye(3, dtype=torch.float64), v)
    assert torch.allclose(datainf_inverse_product(gradients[:1], v, lam), exact, atol=1e-12)
    assert datainf_damping(gradients) == pytest.approx(0.1 * (5 + 10 + 3) / 3 / 3)
    layer = DataInfLayer(gradients.view(3, 1, 3), torch.tensor(0.05, dtype=torch.float64))
    assert torch.allclose(layer.inverse_product(v.view(1, 3), 0.2), closed.view(1, 3), atol=1e-14)  # λ_l + shift
    with pytest.raises(ValueError, match="damping > 0"):
        datainf_inverse_product(gradients, v, 0.0)


@pytest.fixture(scope="module")
def single_layer():
    """``one_lora_weight()``, with LLaMA exact in float64 and one thread while the module runs."""
    with exact_float64_llama(), one_thread():
        yield one_lora_weight()


def test_fit_datainf_stores_per_example_gradients_and_round_trips(single_layer, tmp_path):
    model, tokenizer, params, items, _ = single_layer
    with exact_float64_llama(), one_thread():
        layers = fit_datainf(model, params, items, tokenizer.pad_token_id, batch_size=4)
        rows = per_example_gradients(model, params, items, tokenizer.pad_token_id)
    name = params.names[0]
    assert layers[name].gradients.dtype == torch.float32 and layers[name].gradients.shape == (len(items), 16, 2)
    assert torch.allclose(layers[name].gradients.double().reshape(len(items), -1), rows, rtol=1e-6, atol=1e-9)
    assert float(layers[name].damping) == pytest.approx(datainf_damping(rows), rel=1e-6)
    meta = {"model_fingerprint": "m", "adapter_sha256": "a", "data_sha256": "d"}
    save_cache(layers, tmp_path / "curv", meta)
    assert (tmp_path / "curv" / "datainf.safetensors").is_file()
    loaded, stored = load_cache(tmp_path / "curv", meta)
    assert stored["kind"] == "datainf" and torch.equal(loaded[name].gradients, layers[name].gradients)
    assert float(loaded[name].damping) == float(layers[name].damping)
    with pytest.raises(InputError, match="different model fingerprint"):
        load_cache(tmp_path / "curv", {**meta, "model_fingerprint": "x"})
