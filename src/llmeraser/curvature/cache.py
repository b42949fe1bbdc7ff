"""A fitted curvature cache: its layers, step-length calibration and metadata, saved and loaded as a directory.

A cache directory holds the method's tensor file (``CurvatureMethod.file_name``: ``kfac.safetensors`` for
K-FAC and EK-FAC, ``datainf.safetensors`` for DataInf; one tensor ``layer::field`` per stored field of every
layer) and ``curvature.json`` (``CacheMetadata``: the method as ``kind``, the hashes of base model, adapter
and data it was fitted on, its settings and its ``calibration``). It is written atomically and refused on a
hash mismatch when read. ``fit_curvature_cache`` fits one for an adapter (``fit-curvature``, and the default
``erase`` on first use), ``default_cache_path`` is where the default ``erase`` keeps it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.atomic import atomic_directory
from llmeraser.curvature.calibration import (
    CALIBRATION_DAMPING,
    CALIBRATION_DIRECTIONS,
    CALIBRATION_EXAMPLES,
    StepCalibration,
    calibrate_step_length,
    calibration_pool,
    load_calibration,
)
from llmeraser.curvature.registry import CurvatureLayer, Layers, cache_method, curvature_methods, get_curvature_method
from llmeraser.data import Example, TokenizationConfig, TokenizedExample, tokenize_examples
from llmeraser.distributed import is_distributed, is_main_process
from llmeraser.errors import ConfigError, InputError
from llmeraser.hashing import dataset_hash
from llmeraser.hashing import model_fingerprint as base_fingerprint
from llmeraser.models import cache_dir
from llmeraser.options import option, validate

CURVATURE_META = "curvature.json"
DEFAULT_METHOD = "kfac"  # the method of a cache whose curvature.json has no ``kind`` (the oldest ones)


@dataclass
class CacheMetadata:
    """``curvature.json``: what a cache was fitted with and on. ``kind``: the method; ``damping``: the method's
    own damping (DataInf's λ_l; None: its default); the hashes of the base model (over the adapted modules),
    adapter and data; the fit's sizes and settings; ``fit_time_s``; ``calibration`` (``StepCalibration.to_json``);
    the library ``versions``. Keys it does not know are kept in ``extra`` and written back."""

    kind: str
    damping: float | None = None
    model_fingerprint: str | None = None
    adapter_sha256: str | None = None
    data_sha256: str | None = None
    n_examples: int | None = None
    n_layers: int | None = None
    n_parameters: int | None = None
    max_length: int | None = None
    loss_scope: str | None = None
    seed: int | None = None
    fit_time_s: float | None = None
    calibration: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CacheMetadata:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("kind", DEFAULT_METHOD)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


def cache_tensors(layers: Layers) -> dict[str, Tensor]:
    """The tensors of the cache's tensor file: ``layer::field`` for every stored field of every layer."""
    tensors = {}
    for name, layer in layers.items():
        for item in fields(layer):  # type: ignore[arg-type]  # every layer type is a dataclass
            value = getattr(layer, item.name)
            if value is not None:
                tensors[f"{name}::{item.name}"] = value.contiguous()
    return tensors


def save_cache(layers: Layers, out_dir: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write the tensors (the method's ``file_name``) + ``curvature.json``, whose ``kind`` records the
    method, to a new directory (atomically, ``atomic_directory``)."""
    from safetensors.torch import save_file

    method = cache_method(layers)
    with atomic_directory(out_dir) as tmp:
        save_file(cache_tensors(layers), str(tmp / get_curvature_method(method).file_name))
        stored = {**metadata, "kind": method}
        (tmp / CURVATURE_META).write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def load_cache(
    curvature_dir: str | Path, expected: Mapping[str, str]
) -> tuple[dict[str, CurvatureLayer], dict[str, Any]]:
    """Read a fitted curvature of any registered method (``metadata["kind"]``); raise ``InputError`` if any
    ``expected`` hash differs from the stored one. Returns the layers and ``curvature.json``."""
    from safetensors.torch import load_file

    curvature_dir = Path(curvature_dir)
    meta_path = curvature_dir / CURVATURE_META
    metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    name = metadata.get("kind", DEFAULT_METHOD)
    try:
        method = get_curvature_method(name)
    except ValueError:
        raise InputError(f"unknown curvature method '{name}' in {CURVATURE_META}", curvature_dir) from None
    if not meta_path.is_file() or not (curvature_dir / method.file_name).is_file():
        raise InputError(f"not a curvature directory (needs {CURVATURE_META} and {method.file_name})", curvature_dir)
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise InputError(
                f"the curvature was fitted for a different {key.removesuffix('_sha256').replace('_', ' ')} "
                f"(stored {str(metadata.get(key))[:12]}…, given {value[:12]}…); fit it again with fit-curvature",
                curvature_dir,
            )
    tensors = load_file(str(curvature_dir / method.file_name))
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        layer, item = key.split("::")
        layers.setdefault(layer, {})[item] = tensor
    return {layer: method.from_tensors(**values) for layer, values in layers.items()}, metadata


@dataclass
class CurvatureCache:
    """A fitted curvature: its ``layers`` (one ``CurvatureLayer`` per θ tensor), its step-length
    ``calibration``, its ``metadata`` and where it is stored (None: in memory only)."""

    layers: dict[str, CurvatureLayer]
    calibration: StepCalibration | None
    metadata: CacheMetadata
    path: Path | None = None

    @property
    def method(self) -> str:
        return self.metadata.kind

    @property
    def fit_s(self) -> float:
        """The fit's wall seconds (the calibration's are ``calibration.time_s``)."""
        return float(self.metadata.fit_time_s or 0.0)

    def save(self, out_dir: str | Path) -> CurvatureCache:
        """Write the cache to a new directory ``out_dir`` (atomically); returns it with ``path`` set."""
        save_cache(self.layers, out_dir, self.metadata.to_json())
        return replace(self, path=Path(out_dir))

    @classmethod
    def load(cls, curvature_dir: str | Path, expected: Mapping[str, str] | None = None) -> CurvatureCache:
        """Read a cache directory (any registered method; the old file names included), refused when any
        ``expected`` hash (``model_fingerprint``, ``adapter_sha256``, ``data_sha256``) differs."""
        layers, stored = load_cache(curvature_dir, expected or {})
        return cls(layers, load_calibration(stored), CacheMetadata.from_json(stored), Path(curvature_dir))


def curvature_subset(examples: Sequence[Any], count: int | None, seed: int) -> list[Any]:
    """The examples ``fit-curvature --curvature-examples count`` fits on: a seeded random subset of ``count``
    (in the data's order), or all of them when ``count`` is None or not smaller."""
    if count is None or count >= len(examples):
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return [examples[i] for i in sorted(order[:count].tolist())]


def fit_cached_curvature(
    model: Any,
    params: AdapterParameters,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    method: str = "ekfac",
    *,
    damping: float = CALIBRATION_DAMPING,
    weight_decay: float = 0.0,
    curvature: str = "gauss-newton",
    batch_size: int = 8,
    seed: int = 0,
    calibration_examples: int = CALIBRATION_EXAMPLES,
    calibration_directions: int = CALIBRATION_DIRECTIONS,
    calibration_items: Sequence[TokenizedExample] | None = None,
    datainf_damping: float | None = None,
    distributed: bool = False,
) -> CurvatureCache:
    """Fit the ``method`` curvature on ``items`` and calibrate its step length (``calibrate_step_length``)
    for erasures at ``damping`` + ``weight_decay`` on ``calibration_items`` (default: ``items``);
    ``calibration_examples=0``: no calibration (``erase`` then probes the exact operator itself).
    ``datainf_damping``: the method's own damping, for a method that ``takes_damping``."""
    fit = get_curvature_method(method).fit
    start = time.perf_counter()
    layers = fit(model, params, items, pad_token_id, batch_size=batch_size, seed=seed, distributed=distributed,
                 damping=datainf_damping)
    seconds = time.perf_counter() - start
    calibration = None
    if calibration_examples > 0:
        calibration = calibrate_step_length(
            model, params, layers, items if calibration_items is None else calibration_items, pad_token_id,
            calibration_examples, calibration_directions, damping, weight_decay, curvature, batch_size, seed,
            distributed,
        )
    metadata = CacheMetadata(
        kind=method, damping=datainf_damping, n_examples=len(items), n_layers=len(layers), n_parameters=params.dim,
        seed=seed, fit_time_s=seconds, calibration=calibration.to_json() if calibration else None,
    )
    return CurvatureCache(layers, calibration, metadata)


# --- a cache for an adapter and its training data (fit-curvature; the default erase) -------------------


def adapter_model_fingerprint(model: Any, base: Any) -> str:
    """The base model's fingerprint over the modules ``model``'s (PEFT) adapter targets."""
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None) or ()
    return base_fingerprint(base, targets if isinstance(targets, str) else tuple(sorted(targets)))


@dataclass(frozen=True)
class CurvatureFitConfig:
    """How ``fit-curvature`` (and ``Adapter.fit_curvature``) fits a curvature cache.

    - ``method``: a registered method (``curvature_methods()``: ekfac (default) | kfac | datainf);
      ``curvature_examples``: fit on a random subset of this many examples (None: all); ``datainf_damping``:
      the method's own damping, DataInf's λ_l (None: its own default; only for a method that takes one).
    - ``calibration_examples`` × ``calibration_directions``: the step length α of a direct solve is the median
      over the loss gradients of ``calibration_directions`` random examples, fitted against the exact
      Gauss-Newton operator on ``calibration_examples`` examples (0: no calibration) at
      ``calibration_damping`` + the recipe's weight decay.
    - ``batch_size``: examples per forward pass; ``seed``: of the subsets and sampled labels.
    """

    method: str = option("ekfac", choices=curvature_methods, help="curvature approximation")
    curvature_examples: int | None = option(None, min=1, help="fit on a random subset of this many examples (default: all)")
    calibration_examples: int = option(
        CALIBRATION_EXAMPLES, min=0, help="fit the step length α of erase --curvature-use direct against the exact "
        "Gauss-Newton operator on this many random examples (0: no calibration; erase then fits α on its probe examples)")
    calibration_directions: int = option(
        CALIBRATION_DIRECTIONS, min=1, help="α is the median over the per-example loss gradients of this many random examples")
    calibration_damping: float = option(
        CALIBRATION_DAMPING, min=0.0, help="the damping λ of the calibration: erase uses the calibrated α when its "
        "--damping + weight decay equal this + the recipe's `weight_decay`")
    batch_size: int = option(8, min=1, help="examples per forward pass")
    seed: int = option(0, help="seed of the subset and of the sampled labels")
    datainf_damping: float | None = option(
        None, min=0.0, help="datainf only: λ_l of every layer (default: DataInf's 0.1 · mean ‖g_i‖² / d_l)")

    def __post_init__(self) -> None:
        validate(self)
        if self.datainf_damping is not None and not get_curvature_method(self.method).takes_damping:
            own = " | ".join(name for name in curvature_methods() if get_curvature_method(name).takes_damping)
            raise ConfigError("datainf_damping", f"applies to `method={own}` only, not `method={self.method}`")


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
) -> CurvatureCache:
    """Fit ``method`` on ``curvature_examples`` random training examples (all when None), calibrate its step
    length on all of them (``CurvatureFitConfig`` says what each setting means), and write it to ``out``
    (atomically; rank 0 only; None: not written). Returns the cache, with the metadata stored beside it
    (``curvature.json``) and its ``path`` (``out``)."""
    from llmeraser.eraser import library_versions

    get_curvature_method(method)  # an unknown method is refused before any work
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
    cache.metadata = replace(
        cache.metadata,
        model_fingerprint=model_fingerprint or adapter_model_fingerprint(model, base),
        adapter_sha256=adapter_sha256,
        data_sha256=dataset_hash(examples),
        n_examples=len(chosen),
        max_length=max_length,
        loss_scope=loss_scope,
        versions=library_versions(),
    )
    if out is not None:
        cache.path = Path(out)
        if is_main_process():
            save_cache(cache.layers, out, cache.metadata.to_json())
    return cache
