"""The cached curvature methods by name: what each stores, how it is fitted, and how it is read back.

A method is one module that defines its layer type (``CurvatureLayer``: the inverse product of one θ tensor's
block) and a fit function, and registers itself once (``fit_function``: the fit called with the settings it
takes)::

    register_curvature_method(CurvatureMethod(
        name="kfac", file_name="kfac.safetensors", fit=fit_function(fit_kfac, "batch_size", "seed", "distributed"),
        from_tensors=KroneckerFactors, summary="K-FAC factors", help="Kronecker factors per LoRA layer"))

Everything that chooses a method by name (``fit-curvature --method``, the cache's ``curvature.json``
``kind``, the dry run, the benchmarks) reads it from here (``get_curvature_method``, ``curvature_methods``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import TokenizedExample


class CurvatureLayer(Protocol):
    """One θ tensor's block of a cached curvature K: ``method`` names the method that fitted it, and
    ``inverse_product(matrix, shift)`` applies (K + shift·I)⁻¹ to a tensor of that θ tensor's shape. A
    dataclass of tensors (None fields are not stored), rebuilt from them by ``CurvatureMethod.from_tensors``."""

    @property
    def method(self) -> str: ...

    def inverse_product(self, matrix: Tensor, shift: float) -> Tensor: ...


Layers = Mapping[str, CurvatureLayer]


class FitFunction(Protocol):
    """Fit a method's curvature of every θ tensor over ``items``. ``distributed``: ``items`` are all examples
    and this rank fits its share (sums all-reduced; the same result as one process); ``damping``: the
    method's own damping where it has one (``CurvatureMethod.takes_damping``), None for its default. A method
    module makes its own from its fit function with ``fit_function``."""

    def __call__(
        self,
        model: Any,
        params: AdapterParameters,
        items: Sequence[TokenizedExample],
        pad_token_id: int,
        *,
        batch_size: int,
        seed: int,
        distributed: bool,
        damping: float | None,
    ) -> dict[str, CurvatureLayer]: ...


FitSetting = Literal["batch_size", "seed", "distributed", "damping"]


def fit_function(fit: Callable[..., Mapping[str, CurvatureLayer]], *settings: FitSetting) -> FitFunction:
    """The ``FitFunction`` of a method's own fit function, called as ``fit(model, params, items, pad_token_id,
    **{setting: value})`` with only the ``settings`` it takes (the rest do not apply to the method)."""

    def fitted(model: Any, params: AdapterParameters, items: Sequence[TokenizedExample], pad_token_id: int,
               **given: Any) -> dict[str, CurvatureLayer]:
        return dict(fit(model, params, items, pad_token_id, **{name: given[name] for name in settings}))

    return fitted


@dataclass(frozen=True)
class FitProbe:
    """What a dry run gives a method to estimate its fit with (``CurvatureMethod.estimate_fit``).

    ``batches``: the fit's batches of ``items``; ``time_batches(run, batches)``: the estimated seconds of
    ``run`` over every batch (first-call cost included) and the number of probe calls timed;
    ``time_once(run)``: ``run()``'s result and its seconds (first-call cost included)."""

    model: Any
    params: AdapterParameters
    items: Sequence[TokenizedExample]
    batches: list[Sequence[TokenizedExample]]
    pad_token_id: int
    seed: int
    damping: float | None
    time_batches: Callable[[Callable[[Sequence[TokenizedExample]], Any], list[Sequence[TokenizedExample]]],
                           tuple[float, int]]
    time_once: Callable[[Callable[[], Any]], tuple[Any, float]]


@dataclass(frozen=True)
class FitEstimate:
    """A method's estimated fit: its ``seconds``, ``how`` they were estimated, representative ``layers`` (the
    calibration and save stages are estimated on them) and the MiB the real fit holds beyond the probes'."""

    layers: dict[str, CurvatureLayer]
    seconds: float
    how: str
    extra_mib: float = 0.0


@dataclass(frozen=True)
class CurvatureMethod:
    """A cached curvature method.

    - ``name``: as ``fit-curvature --method`` and ``curvature.json``'s ``kind`` spell it;
      ``file_name``: its tensor file in a cache directory.
    - ``fit``: ``FitFunction``; ``from_tensors(**stored)``: the layer from its stored tensors (one per
      non-None dataclass field).
    - ``summary``: what the fit produced, for messages ("K-FAC factors"); ``help``: one line for ``--help``.
    - ``takes_damping``: the method has a damping of its own (``fit-curvature --damping``).
    - ``estimate_fit``: the dry run's estimate of ``fit`` (None: ``fit`` timed on each batch).
    """

    name: str
    file_name: str
    fit: FitFunction
    from_tensors: Callable[..., CurvatureLayer]
    summary: str
    help: str = ""
    takes_damping: bool = False
    estimate_fit: Callable[[FitProbe], FitEstimate] | None = None


_METHODS: dict[str, CurvatureMethod] = {}


def register_curvature_method(method: CurvatureMethod, *, replace: bool = False) -> CurvatureMethod:
    """Make ``method`` available by its name; a name already taken is refused unless ``replace``."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"a curvature method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_curvature_method(name: str) -> None:
    """Remove a registered method (a test's toy method, say)."""
    _METHODS.pop(name, None)


def curvature_methods() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def get_curvature_method(name: str) -> CurvatureMethod:
    """The method registered as ``name``; ``ValueError`` naming the registered ones otherwise."""
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown curvature method {name!r} (expected one of: {', '.join(_METHODS)})")
    return method


def cache_method(layers: Layers) -> str:
    """The method of a fitted curvature (every layer's ``method``: one)."""
    methods = {layer.method for layer in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"a curvature cache holds one method, got {sorted(methods)}")
    return methods.pop()


def default_fit_estimate(method: CurvatureMethod, probe: FitProbe) -> FitEstimate:
    """A method without ``estimate_fit``: its ``fit`` timed on each batch (the last batch's layers kept)."""
    last: dict[str, dict[str, CurvatureLayer]] = {}

    def run(batch: Sequence[TokenizedExample]) -> None:
        last["layers"] = dict(method.fit(probe.model, probe.params, batch, probe.pad_token_id, batch_size=len(batch),
                                         seed=probe.seed, distributed=False, damping=probe.damping))

    seconds, probes = probe.time_batches(run, probe.batches)
    how = f"the fit on each of {len(probe.batches)} batches; {probes} probe passes"
    return FitEstimate(last["layers"], seconds, how)
