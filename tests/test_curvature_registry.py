"""The curvature method registry: the built-in methods by name, and a toy method added with one registration
that fit-curvature, the dry run, the cache directory and erase then know by name."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from cli_helpers import FAST_TRAIN, cli, erase_with_cache
from conftest import tiny_lora_model, toy_examples
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature import (
    CacheMetadata,
    CurvatureCache,
    CurvatureLayer,
    CurvatureMethod,
    KroneckerFactors,
    curvature_methods,
    fit_cached_curvature,
    get_curvature_method,
    register_curvature_method,
    save_cache,
    unregister_curvature_method,
)
from llmeraser.data import TokenizationConfig, TokenizedExample, tokenize_examples, write_examples
from llmeraser.eraser import erase
from llmeraser.gradients import per_example_gradients
from llmeraser.requests import Remove
from llmeraser.train import TrainConfig, train_adapter

TOY = "toy-identity"


# --- the toy method: what a new method's module holds ---------------------------------------------------


@dataclass
class ScaledIdentity:
    """K = s·I for one θ tensor, s the mean squared per-example gradient entry (a 0-d tensor)."""

    scale: Tensor

    method = TOY

    def inverse_product(self, matrix: Tensor, shift: float) -> Tensor:
        return matrix / (float(self.scale) + shift)


def fit_scaled_identity(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    batch_size: int,
    seed: int,
    distributed: bool,
    damping: float | None,
) -> dict[str, CurvatureLayer]:
    rows = per_example_gradients(model, params, items, pad_token_id, chunk_size=batch_size)
    pieces = torch.split(rows, [s.numel() for s in params.shapes], dim=1)
    return {name: ScaledIdentity((piece.to(torch.float64) ** 2).mean()) for name, piece in zip(params.names, pieces)}


TOY_METHOD = CurvatureMethod(name=TOY, file_name="toy.safetensors", fit=fit_scaled_identity,
                             from_tensors=ScaledIdentity, summary="scaled identities", help="a test's toy method")


@pytest.fixture
def toy() -> Iterator[CurvatureMethod]:
    register_curvature_method(TOY_METHOD)
    try:
        yield TOY_METHOD
    finally:
        unregister_curvature_method(TOY)
    assert TOY not in curvature_methods()


# --- tests -------------------------------------------------------------------------------------------


def test_the_built_in_methods_are_registered_with_their_files():
    assert curvature_methods()[:3] == ("kfac", "ekfac", "datainf")
    assert get_curvature_method("kfac").file_name == get_curvature_method("ekfac").file_name == "kfac.safetensors"
    assert get_curvature_method("datainf").file_name == "datainf.safetensors"
    assert [m for m in curvature_methods() if get_curvature_method(m).takes_damping] == ["datainf"]
    with pytest.raises(ValueError, match="unknown curvature method 'nope'.*kfac, ekfac, datainf"):
        get_curvature_method("nope")


def test_a_name_is_registered_once(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_curvature_method(toy)
    register_curvature_method(toy, replace=True)
    assert get_curvature_method(TOY) is toy


def test_a_toy_method_fits_and_erases_in_the_library(toy):
    model, tokenizer = tiny_lora_model(r=2)
    train = toy_examples(12, seed=3)
    train_adapter(model, tokenizer, train, TrainConfig(epochs=10, lr=2e-2, batch_size=8, weight_decay=0.1))
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, train, TokenizationConfig(max_length=256))
    settings = dict(damping=1e-3, weight_decay=0.1)
    cache = fit_cached_curvature(model, params, items, tokenizer.pad_token_id, TOY, calibration_examples=6,
                                 calibration_directions=3, **settings)
    assert cache.method == TOY and set(cache.layers) == set(params.names)
    assert all(isinstance(layer, ScaledIdentity) for layer in cache.layers.values())
    requests = [Remove("ex1")]
    exact = erase(model, tokenizer, train, requests, solver="cg", tol=1e-9, max_iters=200, **settings)
    direct = erase(model, tokenizer, train, requests, curvature_cache=cache.layers, calibration=cache.calibration,
                   curvature_use="direct", **settings)
    assert direct.report["curvature_cache_method"] == TOY
    assert direct.solver.details["curvature_cache"] == f"{TOY} direct"
    assert direct.solver.details["step_length_source"] == "calibrated at fit time"
    # α b / (s + shift): along b, whose cosine with the exact (H + λI)⁻¹ b is positive
    assert float(torch.nn.functional.cosine_similarity(direct.update, exact.update, dim=0)) > 0


def test_a_toy_method_runs_through_fit_curvature_and_erase(toy, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, toy_examples(10, seed=5))
    assert cli("train", "--model", "tiny", "--data", data, "--out", tmp_path / "adapter", *FAST_TRAIN).code == 0
    fit = ("fit-curvature", "--adapter", tmp_path / "adapter", "--data", data, "--method", TOY,
           "--curvature-examples", "6", "--calibration-examples", "4", "--calibration-directions", "2")
    dry = cli(*fit, "--out", tmp_path / "dry", "--dry-run")
    assert dry.code == 0, dry.err
    assert f"fit ({TOY})" in dry.out and not (tmp_path / "dry").exists()
    done = cli(*fit, "--out", tmp_path / "curv")
    assert done.code == 0, done.err
    assert "scaled identities of" in done.out
    assert (tmp_path / "curv" / "toy.safetensors").is_file()
    stored = json.loads((tmp_path / "curv" / "curvature.json").read_text())
    assert stored["kind"] == TOY and stored["n_examples"] == 6 and stored["calibration"]
    loaded = CurvatureCache.load(tmp_path / "curv")
    assert loaded.method == TOY and all(isinstance(layer, ScaledIdentity) for layer in loaded.layers.values())
    erase_with_cache(tmp_path, data, TOY)
    done = cli(*fit, "--out", tmp_path / "x", "--damping", "0.1")
    assert done.code == 2 and "datainf only" in done.err


def test_unregistered_methods_are_refused_and_old_caches_without_a_kind_load_as_kfac(toy, tmp_path):
    factors = {"w": KroneckerFactors(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                                     torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))}
    save_cache(factors, tmp_path / "old", {"adapter_sha256": "a", "legacy_key": 1})
    meta = tmp_path / "old" / "curvature.json"
    stored = json.loads(meta.read_text())
    del stored["kind"]  # the oldest caches: K-FAC, no ``kind``
    meta.write_text(json.dumps(stored))
    cache = CurvatureCache.load(tmp_path / "old", {"adapter_sha256": "a"})
    assert cache.method == "kfac" and torch.equal(cache.layers["w"].g_vectors, factors["w"].g_vectors)
    assert cache.metadata.extra == {"legacy_key": 1} and cache.calibration is None
    resaved = cache.save(tmp_path / "again")
    assert resaved.path == tmp_path / "again"
    assert CacheMetadata.from_json(json.loads((tmp_path / "again" / "curvature.json").read_text())) == cache.metadata
    toy_dir = CurvatureCache({"w": ScaledIdentity(torch.tensor(2.0))}, None, CacheMetadata(kind=TOY)).save(
        tmp_path / "toy").path
    assert toy_dir is not None and CurvatureCache.load(toy_dir).layers["w"].scale == 2.0
    unregister_curvature_method(TOY)
    from llmeraser.errors import InputError

    with pytest.raises(InputError, match=f"unknown curvature method '{TOY}'"):
        CurvatureCache.load(toy_dir)
