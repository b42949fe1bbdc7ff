"""The curvature of the training objective in θ, exact or cached.

- ``operators``: the exact operators v ↦ (C + shift·I) v (Hessian, Gauss–Newton) the solvers use.
- ``registry``: the cached methods by name (``CurvatureMethod``, ``register_curvature_method``, ``fit_function``,
  ``get_curvature_method``, ``curvature_methods``); ``inverse``: ``CachedInverse``, the inverse product of
  any of them over θ.
- one module per cached method, each registering itself: ``kfac`` (K-FAC), ``ekfac`` (EK-FAC), ``datainf``
  (DataInf); ``hooks``: the LoRA layers and the sampled passes K-FAC and EK-FAC share.
- ``calibration``: the step length of a cached curvature, fitted once against the exact operator.
- ``cache``: ``CurvatureCache`` (layers, calibration, typed metadata; saves and loads itself) and the fit of
  one for an adapter (``fit_curvature_cache``, ``CurvatureFitConfig``, ``default_cache_path``).

Adding a method is one module that defines its layer type and fit function and calls
``register_curvature_method`` (its ``fit``: ``fit_function`` of that fit function); ``fit-curvature --method``,
the cache files, the dry run and ``erase`` then know it by name.
"""

# ruff: noqa: I001  (the built-in methods register as they are imported: kfac, ekfac, datainf, the order of
# ``curvature_methods()`` and of ``fit-curvature --method``'s choices)
from llmeraser.curvature.operators import (
    CURVATURE_KINDS,
    CurvatureKind,
    CurvatureOperator,
    gauss_newton_vector_product,
    hessian_vector_product,
)
from llmeraser.curvature.registry import (
    CurvatureLayer,
    CurvatureMethod,
    FitEstimate,
    FitProbe,
    cache_method,
    curvature_methods,
    fit_function,
    get_curvature_method,
    register_curvature_method,
    unregister_curvature_method,
)
from llmeraser.curvature.inverse import CachedInverse
from llmeraser.curvature.kfac import KroneckerFactors, fit_kfac
from llmeraser.curvature.ekfac import fit_ekfac
from llmeraser.curvature.datainf import DataInfLayer, fit_datainf
from llmeraser.curvature.calibration import StepCalibration, calibrate_step_length, load_calibration, step_length
from llmeraser.curvature.cache import (
    CURVATURE_META,
    CacheMetadata,
    CurvatureCache,
    CurvatureFitConfig,
    default_cache_path,
    fit_cached_curvature,
    fit_curvature_cache,
    load_cache,
    save_cache,
)

__all__ = [
    "CURVATURE_KINDS",
    "CURVATURE_META",
    "CacheMetadata",
    "CachedInverse",
    "CurvatureCache",
    "CurvatureFitConfig",
    "CurvatureKind",
    "CurvatureLayer",
    "CurvatureMethod",
    "CurvatureOperator",
    "DataInfLayer",
    "FitEstimate",
    "FitProbe",
    "KroneckerFactors",
    "StepCalibration",
    "cache_method",
    "calibrate_step_length",
    "curvature_methods",
    "default_cache_path",
    "fit_cached_curvature",
    "fit_curvature_cache",
    "fit_datainf",
    "fit_ekfac",
    "fit_function",
    "fit_kfac",
    "gauss_newton_vector_product",
    "get_curvature_method",
    "hessian_vector_product",
    "load_cache",
    "load_calibration",
    "register_curvature_method",
    "save_cache",
    "step_length",
    "unregister_curvature_method",
]
