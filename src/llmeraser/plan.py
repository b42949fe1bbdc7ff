"""What the default ``erase`` does: a paired retrain or the cached trust-region update, whichever is cheaper.

Costs are counted in *example passes*: one forward and backward pass of one training example (a forward
pass alone counts 1/3). The counts follow what each path runs (``llmeraser.train``, ``llmeraser.curvature``,
``llmeraser.trust_region``); their ratio, not their seconds, decides. Retraining is exact by construction,
so where it costs no more than the update it is the better answer; the update wins on large training sets
and long recipes, and whenever its curvature is already fitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from llmeraser.train import LBFGS_MAX_ITER
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


def update_cost(n_old: int, n_new: int, kept: int, heldout: int, steps: int, evaluations_per_step: float = 3.0) -> float:
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
