"""What the default ``erase`` does: a paired retrain or the cached trust-region update, whichever is cheaper.

Costs are counted in *example passes*: one forward and backward pass of one training example (a forward
pass alone counts 1/3). The counts follow what each path runs (``llmeraser.train``, ``llmeraser.curvature``,
``llmeraser.trust_region``); their ratio, not their seconds, decides. Retraining is exact by construction,
so where it costs no more than the update it is the better answer; the update wins on large training sets
and long recipes, and whenever its curvature is already fitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmeraser.curvature.cache import CurvatureCache, CurvatureFitConfig
from llmeraser.eraser import DEFAULT_PROBE_EXAMPLES, EraseConfig
from llmeraser.train import LBFGS_MAX_ITER, TrainConfig
from llmeraser.trust_region import TrustRegionSettings

FORWARD = 1.0 / 3.0  # a forward pass, in example passes
GAUSS_NEWTON_PRODUCT = 3.0  # one exact Gauss–Newton product per example (jvp + vjp)
LBFGS_EVALUATIONS = LBFGS_MAX_ITER  # objective evaluations per L-BFGS outer step, as llmeraser.train runs them

# the automatic path's settings: EK-FAC fitted on at most AUTO_CURVATURE_EXAMPLES examples
AUTO_CACHE_METHOD = "ekfac"
AUTO_CURVATURE_EXAMPLES = 256
AUTO_CALIBRATION_EXAMPLES = 8
AUTO_CALIBRATION_DIRECTIONS = 4
AUTO_TRUST_REGION_STEPS = TrustRegionSettings.steps
LINE_SEARCH_EVALUATIONS = 3.0  # evaluations of a trust-region step's line search, as the cost model and dry run count them
# the update is chosen only when predicted to cost at most 1/RETRAIN_MARGIN of a retrain: retraining is exact,
# and the prediction (a count of passes, not seconds) is only good to a factor of about two
RETRAIN_MARGIN = 2.0


@dataclass(frozen=True)
class ErasePlan:
    """The chosen path (``retrain`` | ``update``), why, and the predicted costs in example passes."""

    choice: Literal["retrain", "update"]
    reason: str
    retrain_cost: float | None
    fit_cost: float
    update_cost: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def retrain_cost(n_examples: int, epochs: int, optimizer: str) -> float:
    """Example passes of training on ``n_examples`` with the recipe: epochs × n (Adam); L-BFGS evaluates
    the full objective and gradient up to ``LBFGS_EVALUATIONS`` times per outer step (an upper bound)."""
    return float(epochs * n_examples * (LBFGS_EVALUATIONS if optimizer == "lbfgs" else 1))


def fit_cost(n_curvature: int, calibration_examples: int, calibration_directions: int) -> float:
    """Fitting EK-FAC on ``n_curvature`` examples (a sampled-label pass for the factors, a per-example
    gradient pass for the eigenvalues) and calibrating its step length (one per-example gradient per
    direction, ``directions`` exact products over ``calibration_examples`` examples)."""
    return 2.5 * n_curvature + calibration_directions * (1 + GAUSS_NEWTON_PRODUCT * calibration_examples)


def update_cost(n_old: int, n_new: int, kept: int, heldout: int, steps: int,
                evaluations_per_step: float = LINE_SEARCH_EVALUATIONS) -> float:
    """The trust-region update: b from the edited examples' old and new versions, then per step one
    gradient over the kept sample and the replacements and a few line-search evaluations (forward passes
    over the kept sample, the edited and the held-out examples)."""
    per_step = (kept + n_new) + evaluations_per_step * FORWARD * (kept + n_old + n_new + heldout)
    return float(n_old + n_new + steps * per_step)


def configured_update_cost(
    solver: str, max_iters: int, n_curvature: int, n_old: int, n_new: int, cached_direct: bool, batch_size: int = 8,
    probe_examples: int = 64,
) -> float:
    """An upper bound of a configured one-step update: b, then ``max_iters`` exact products over the
    curvature examples (cg), over mini-batches (lissa, sgd: ``batch_size`` examples each, plus the probe),
    one dense build (direct: one product per parameter is not counted here), or none (a calibrated cache)."""
    b = float(n_old + n_new)
    if cached_direct:
        return b
    if solver == "cg":
        return b + max_iters * GAUSS_NEWTON_PRODUCT * n_curvature
    if solver in ("lissa", "sgd"):
        return b + max_iters * GAUSS_NEWTON_PRODUCT * (batch_size + probe_examples / 10)
    return b + GAUSS_NEWTON_PRODUCT * n_curvature


def plan_erase(
    *,
    n_train: int,
    n_removed: int,
    n_old: int,
    n_new: int,
    recipe: Any | None,
    cache_fitted: bool,
    kept_examples: int = 64,
    heldout: int = 0,
    steps: int = AUTO_TRUST_REGION_STEPS,
) -> ErasePlan:
    """Choose between a paired retrain (needs the training ``recipe``) and the cached trust-region update
    (fitting the curvature first unless ``cache_fitted``) by predicted cost."""
    kept = min(kept_examples, n_train - n_old)
    fit = 0.0 if cache_fitted else fit_cost(min(n_train, AUTO_CURVATURE_EXAMPLES), AUTO_CALIBRATION_EXAMPLES,
                                            AUTO_CALIBRATION_DIRECTIONS)
    update = update_cost(n_old, n_new, kept, heldout, steps)
    if recipe is None:
        return ErasePlan("update", "no training record: a retrain's recipe is unknown", None, fit, update)
    retrain = retrain_cost(n_train - n_removed, recipe.epochs, recipe.optimizer)
    if RETRAIN_MARGIN * (fit + update) > retrain:
        return ErasePlan("retrain", f"a paired retrain ({retrain:,.0f} example passes) is exact and costs less than "
                         f"{RETRAIN_MARGIN:g}× {'fitting the curvature and ' if not cache_fitted else ''}updating "
                         f"({fit + update:,.0f})", retrain, fit, update)
    return ErasePlan("update", f"the cached trust-region update ({fit + update:,.0f} example passes"
                     f"{', curvature fit included' if not cache_fitted else ''}) costs less than 1/{RETRAIN_MARGIN:g} of a "
                     f"paired retrain ({retrain:,.0f})", retrain, fit, update)


# ------------------------------------------------------------------------------------- the resolved plan

SOLVER_FIELDS = ("solver", "curvature", "damping", "scaling", "max_iters", "tol", "curvature_examples",
                 "curvature_use", "probe_examples", "auto_damping")
"""The ``EraseConfig`` fields that configure the influence update by hand: given any of them (or a curvature
cache), ``mode="auto"`` runs the update they configure instead of choosing by cost."""


def auto_fit_config(batch_size: int = 8, seed: int = 0) -> CurvatureFitConfig:
    """The curvature the automatic path fits on first use (and the Trainer callback fits ahead of it)."""
    return CurvatureFitConfig(method=AUTO_CACHE_METHOD, curvature_examples=AUTO_CURVATURE_EXAMPLES,
                              calibration_examples=AUTO_CALIBRATION_EXAMPLES,
                              calibration_directions=AUTO_CALIBRATION_DIRECTIONS, batch_size=batch_size, seed=seed)


@dataclass(frozen=True)
class EraseRun:
    """One erase, resolved before anything runs: the dry run estimates this object and the real run executes
    it (``Adapter.plan_erase``, ``Adapter.estimate_plan``, ``Adapter.run_plan``), so the two cannot differ.

    - ``mode``: ``retrain`` (a paired retrain with the recorded recipe) or ``update`` (the influence update
      as ``config`` says); ``requested``: the mode asked for (``auto`` | ``update`` | ``retrain``).
    - ``choice``: the cost comparison behind an automatic choice (None when the mode or the solver options
      decided).
    - ``config``: the update's ``EraseConfig`` (None for a retrain).
    - ``cache_path``: the curvature directory the update reads; ``fit``: the ``CurvatureFitConfig`` it is
      fitted with first (None when it exists or no cache is used).
    - ``warning``: a configured update predicted to cost more than a paired retrain says so here.
    - ``cache``: the curvature at ``cache_path`` as loaded (and checked) while planning, when it existed then.
    """

    mode: Literal["retrain", "update"]
    requested: str
    choice: ErasePlan | None = None
    config: EraseConfig | None = None
    cache_path: Path | None = None
    fit: CurvatureFitConfig | None = None
    warning: str | None = None
    cache: CurvatureCache | None = field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        """One line: what runs and, for an automatic choice, why."""
        return f"erase --mode {self.requested}: {self.mode}" + (
            f" ({self.choice.reason})" if self.requested == "auto" and self.choice else "")

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "requested": self.requested, **(self.choice.to_json() if self.choice else {}),
                "cache_path": str(self.cache_path) if self.cache_path else None,
                "fit_first": asdict(self.fit) if self.fit is not None else None}


def dearer_than_retraining(config: EraseConfig, recipe: TrainConfig | None, n_train: int, n_removed: int, n_old: int,
                           cached_direct: bool) -> str | None:
    """The warning for a configured one-step update predicted to cost more than a paired retrain (None when
    it does not, or without a recipe to retrain with)."""
    if recipe is None:
        return None
    n_curvature = min(config.curvature_examples or n_train, n_train - n_removed)
    cost = configured_update_cost(config.solver, config.max_iters, n_curvature, n_old, n_old - n_removed,
                                  cached_direct=cached_direct, batch_size=config.batch_size,
                                  probe_examples=config.probe_examples or DEFAULT_PROBE_EXAMPLES)
    retrain = retrain_cost(n_train - n_removed, recipe.epochs, recipe.optimizer)
    if cost <= retrain:
        return None
    return (f"this update is predicted to cost up to {cost:,.0f} example passes, more than a paired retrain "
            f"({retrain:,.0f}); `mode=retrain` is exact, and without solver options `mode=auto` chooses the cheaper")
