"""The step length of a cached curvature, calibrated once at fit time against the exact operator.

A cached curvature K (K-FAC, EK-FAC, DataInf, ...) has the right shape but not necessarily the right scale:
``erase --curvature-use direct`` takes v = α (K + shift·I)⁻¹ b with the step length α fitted here against
the exact operator (``llmeraser.curvature.operators``), so that it needs no exact curvature product itself.
It is stored in the cache's ``curvature.json`` as ``calibration``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.inverse import CachedInverse
from llmeraser.curvature.operators import CurvatureOperator
from llmeraser.curvature.registry import Layers
from llmeraser.data import TokenizationConfig, TokenizedExample, tokenize_examples
from llmeraser.distributed import shard
from llmeraser.gradients import per_example_gradients

# the step-length calibration's defaults (fit_cached_curvature, CurvatureFitConfig, fit-curvature)
CALIBRATION_EXAMPLES = 16
CALIBRATION_DIRECTIONS = 8
CALIBRATION_DAMPING = 1e-2


def step_length(g: Tensor, d: Tensor, hd: Tensor) -> float:
    """The step length α = gᵀd / dᵀH̃d along a direction d (p,), for a right-hand side g (p,) and the
    exact product H̃d = (H + shift·I) d (p,): the minimiser of the quadratic model ½α² dᵀH̃d − α gᵀd of
    ½ vᵀH̃v − gᵀv along v = α d (so α d is never worse than v = 0 in that model). With d = (K + shift·I)⁻¹ g
    it corrects the scale of the cached curvature K. Returns 1.0 (d as it is) when dᵀH̃d ≤ 0."""
    curvature = float(d.to(torch.float64) @ hd.to(torch.float64))
    return float(g.to(torch.float64) @ d.to(torch.float64)) / curvature if curvature > 0 else 1.0


SHIFT_RTOL = 1e-6


@dataclass(frozen=True)
class StepCalibration:
    """The step length α of ``erase --curvature-use direct`` (v = α (K + shift·I)⁻¹ b), fitted once.

    ``step_length``: the median of ``step_lengths`` α_j = step_length(g_j, d_j, H̃d_j) over per-example loss
    gradients g_j of random training examples, d_j = (K + shift·I)⁻¹ g_j, H̃ = H + shift·I the exact
    ``curvature`` operator over ``n_examples`` random training examples with shift = ``damping`` +
    ``weight_decay``; ``residuals``: ‖α H̃ d_j − g_j‖ / ‖g_j‖ at the median α. Valid for an erasure whose
    total shift and curvature kind are the same (``mismatch``).
    """

    step_length: float
    step_lengths: list[float]
    residuals: list[float]
    damping: float
    weight_decay: float
    curvature: str
    n_examples: int
    n_directions: int
    seed: int
    time_s: float

    @property
    def shift(self) -> float:
        """The multiple of the identity in H̃: damping + weight decay."""
        return self.damping + self.weight_decay

    def mismatch(self, shift: float, curvature: str) -> str | None:
        """Why this calibration does not hold for an erasure with total ``shift`` (damping + weight decay)
        and ``curvature`` kind; None when it does (shifts equal within relative tolerance ``SHIFT_RTOL``)."""
        if curvature != self.curvature:
            return f"the step length was calibrated for the {self.curvature} curvature, the erasure uses {curvature}"
        if abs(shift - self.shift) > SHIFT_RTOL * max(abs(shift), abs(self.shift)):
            return (f"the step length was calibrated at damping + weight decay = {self.damping:g} + "
                    f"{self.weight_decay:g} "
                    f"= {self.shift:g}, the erasure uses {shift:g}")
        return None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shift": self.shift}

    @classmethod
    def planned(cls, damping: float, weight_decay: float, examples: int, directions: int, seed: int,
                curvature: str = "gauss-newton") -> StepCalibration:
        """A calibration not yet run (a dry run's stand-in): its settings, with the step lengths unknown (NaN)."""
        return cls(math.nan, [], [], damping, weight_decay, curvature, examples, directions, seed, 0.0)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepCalibration:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def load_calibration(metadata: dict[str, Any]) -> StepCalibration | None:
    """The step-length calibration stored in a cache's ``curvature.json`` (``load_cache``'s metadata), if any."""
    stored = metadata.get("calibration")
    return StepCalibration.from_json(stored) if stored else None


def calibration_draws(
    items: Sequence[TokenizedExample], examples: int, directions: int, seed: int
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """The seeded random draws of ``calibrate_step_length``: (the exact operator's ``examples`` items, the
    ``directions`` items whose per-example gradients give the directions), each in the items' order."""
    subset = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[: min(examples, len(items))]
    drawn = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 1))[: min(directions, len(items))]
    return [items[i] for i in sorted(subset.tolist())], [items[i] for i in sorted(drawn.tolist())]


def calibrate_step_length(
    model: Any,
    params: AdapterParameters,
    layers: Layers,
    items: Sequence[TokenizedExample],
    pad_token_id: int,
    examples: int = 16,
    directions: int = 8,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
    curvature: str = "gauss-newton",
    batch_size: int = 8,
    seed: int = 0,
    distributed: bool = False,
) -> StepCalibration:
    """Fit ``StepCalibration`` for the cached curvature ``layers`` on the training ``items``: the exact
    operator over a seeded random subset of ``examples`` items, the directions from the per-example loss
    gradients of ``directions`` other random draws (the gradients b is made of). Costs ``directions``
    exact products over the subset and one per-example gradient pass. ``distributed``: every rank computes
    the same directions; the operator's examples are sharded and its products all-reduced."""
    start = time.perf_counter()
    curvature_items, direction_items = calibration_draws(items, examples, directions, seed)
    operator = CurvatureOperator(
        model, params, shard(curvature_items) if distributed else curvature_items, pad_token_id,
        curvature, damping, weight_decay, batch_size, distributed=distributed,  # type: ignore[arg-type]
    )
    gradients = per_example_gradients(model, params, direction_items, pad_token_id, batch_size)
    inverse = CachedInverse(layers, params, operator.shift)
    solved = torch.stack([inverse(g) for g in gradients])
    products = operator.matmat(solved)
    alphas = [step_length(g, d, hd) for g, d, hd in zip(gradients, solved, products)]
    alpha = statistics.median(alphas)
    residuals = [float((alpha * hd - g).norm() / g.norm()) if float(g.norm()) > 0 else 0.0
                 for g, hd in zip(gradients, products)]
    return StepCalibration(alpha, alphas, residuals, damping, weight_decay, curvature, operator.count, len(alphas),
                           seed, time.perf_counter() - start)


def calibration_pool(
    tokenizer: Any,
    examples: Sequence[Any],
    fitted: Sequence[TokenizedExample],
    calibration_examples: int,
    config: TokenizationConfig,
) -> Sequence[TokenizedExample]:
    """The items ``fit-curvature`` calibrates the step length on: all ``examples``, tokenised — the
    ``fitted`` items themselves when they are all of them, or when there is no calibration."""
    if calibration_examples == 0 or len(fitted) == len(examples):
        return fitted
    return tokenize_examples(tokenizer, examples, config)
