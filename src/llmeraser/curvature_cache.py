"""Fit a curvature cache for an adapter and write it with the hashes it holds for (``fit-curvature``, and
the default ``erase`` on first use), or find the one fitted before in the user cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmeraser.data import Example, TokenizationConfig, tokenize_examples
from llmeraser.distributed import is_distributed, is_main_process
from llmeraser.hashing import dataset_hash
from llmeraser.hashing import model_fingerprint as base_fingerprint
from llmeraser.kfac import (
    CALIBRATION_DAMPING,
    CALIBRATION_DIRECTIONS,
    CALIBRATION_EXAMPLES,
    CachedCurvature,
    calibration_pool,
    curvature_subset,
    fit_cached_curvature,
    save_kfac,
)
from llmeraser.model import AdapterParameters, cache_dir


def adapter_model_fingerprint(model: Any, base: Any) -> str:
    """The base model's fingerprint over the modules ``model``'s (PEFT) adapter targets."""
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None) or ()
    return base_fingerprint(base, targets if isinstance(targets, str) else tuple(sorted(targets)))


@dataclass(frozen=True)
class CurvatureFitConfig:
    """How ``fit-curvature`` (and ``Adapter.fit_curvature``) fits a curvature cache.

    - ``method``: ekfac (default) | kfac | datainf; ``curvature_examples``: fit on a random subset of this
      many examples (None: all); ``datainf_damping``: DataInf's λ_l (None: its own default).
    - ``calibration_examples`` × ``calibration_directions``: the step length α of a direct solve is the median
      over the loss gradients of ``calibration_directions`` random examples, fitted against the exact
      Gauss-Newton operator on ``calibration_examples`` examples (0: no calibration) at
      ``calibration_damping`` + the recipe's weight decay.
    - ``batch_size``: examples per forward pass; ``seed``: of the subsets and sampled labels.
    """

    method: str = "ekfac"
    curvature_examples: int | None = None
    calibration_examples: int = CALIBRATION_EXAMPLES
    calibration_directions: int = CALIBRATION_DIRECTIONS
    calibration_damping: float = CALIBRATION_DAMPING
    batch_size: int = 8
    seed: int = 0
    datainf_damping: float | None = None


def default_cache_path(adapter_sha256: str, data_sha256: str, model_fingerprint_: str, method: str) -> Path:
    """Where the default ``erase`` keeps the curvature it fits: the user cache (``$LLMERASER_CACHE`` or
    ``~/.cache/llmeraser``), never inside the input adapter, keyed by the adapter, data and base model."""
    key = f"{method}-{adapter_sha256[:16]}-{data_sha256[:16]}-{model_fingerprint_[:12]}"
    return cache_dir() / "curvature" / key


def fit_curvature_cache(
    model: Any,
    tokenizer: Any,
    base: Any,
    examples: Sequence[Example],
    adapter_sha256: str,
    out: str | Path | None,
    *,
    method: str = "ekfac",
    curvature_examples: int | None = None,
    max_length: int = 256,
    loss_scope: str = "response",
    weight_decay: float = 0.0,
    calibration_damping: float = CALIBRATION_DAMPING,
    calibration_examples: int = CALIBRATION_EXAMPLES,
    calibration_directions: int = CALIBRATION_DIRECTIONS,
    batch_size: int = 8,
    seed: int = 0,
    datainf_damping: float | None = None,
    model_fingerprint: str | None = None,
) -> tuple[CachedCurvature, dict[str, Any]]:
    """Fit ``method`` on ``curvature_examples`` random training examples (all when None), calibrate its step
    length on all of them (``CurvatureFitConfig`` says what each setting means), and write it to ``out``
    (atomically; rank 0 only; None: not written). Returns the cache and the metadata stored beside it (``curvature.json``)."""
    from llmeraser.eraser import library_versions

    tokenization = TokenizationConfig(max_length=max_length, loss_scope=loss_scope)
    chosen = curvature_subset(examples, curvature_examples, seed)
    items = tokenize_examples(tokenizer, chosen, tokenization)
    params = AdapterParameters.of(model)
    every = calibration_pool(tokenizer, examples, items, calibration_examples, tokenization)
    cache = fit_cached_curvature(
        model, params, items, tokenizer.pad_token_id, method, damping=calibration_damping,
        weight_decay=weight_decay, batch_size=batch_size, seed=seed,
        calibration_examples=calibration_examples, calibration_directions=calibration_directions,
        calibration_items=every, datainf_damping=datainf_damping,
        distributed=is_distributed(),  # each rank fits its batches; sums and exact products all-reduced
    )
    metadata = {
        "kind": method,
        "damping": datainf_damping,
        "model_fingerprint": model_fingerprint or adapter_model_fingerprint(model, base),
        "adapter_sha256": adapter_sha256,
        "data_sha256": dataset_hash(examples),
        "n_examples": len(chosen),
        "n_layers": len(cache.factors),
        "n_parameters": params.dim,
        "max_length": max_length,
        "loss_scope": loss_scope,
        "seed": seed,
        "fit_time_s": cache.fit_s,
        "calibration": cache.calibration.to_json() if cache.calibration else None,
        "versions": library_versions(),
    }
    if out is not None and is_main_process():
        save_kfac(cache.factors, out, metadata)
    return cache, metadata
