"""The yardstick: a method against the distribution of retrained models, over paired seeds.

For one metric and seeds s = 1..S, o_s is the original adapter's figure, r_s its paired retrain's and m_s the
method's (each from the original of seed s). The removal's own effect is D_s = r_s − o_s, the method's move
N_s = m_s − o_s, and the effect captured is E = mean(N) / mean(D) (1 = the retrained models' mean, 0 = no
change). Its standard error comes from the delta method over the paired seeds,

    SE(E)² ≈ [Var(N̄) − 2 E Cov(N̄, D̄) + E² Var(D̄)] / D̄²,   Var(X̄) = sample variance / S,

and the 95 % interval is E ± t_{S−1} SE(E). The effect is resolved when D̄'s own interval excludes 0; the
smallest effect a setting resolves is that interval's half-width, t_{S−1} SE(D̄).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def t_quantile(count: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile for ``count`` paired seeds (``count − 1`` degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, count - 1)) if count > 1 else float("nan")


def _clean(*columns: Sequence[float]) -> list[np.ndarray]:
    """The seeds at which every column is finite."""
    stacked = np.array([list(c) for c in columns], dtype=float)
    keep = np.isfinite(stacked).all(axis=0)
    return [row[keep] for row in stacked]


def removal_effect(original: Sequence[float], retrain: Sequence[float]) -> dict[str, Any]:
    """D̄ = mean(retrain − original) over paired seeds, its SE, 95 % half-width and whether it is resolved."""
    o, r = _clean(original, retrain)
    d = r - o
    n = len(d)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "half_width": float("nan"), "n": 0, "resolved": False}
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    half = t_quantile(n) * se
    return {"mean": float(d.mean()), "se": se, "half_width": half, "n": n,
            "resolved": bool(n > 1 and abs(float(d.mean())) > half)}


def effect_captured(method: Sequence[float], original: Sequence[float], retrain: Sequence[float]) -> dict[str, Any]:
    """E = mean(method − original) / mean(retrain − original) with its delta-method SE and 95 % interval."""
    m, o, r = _clean(method, original, retrain)
    n = len(m)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    moved, effect = m - o, r - o
    denominator = float(effect.mean())
    if denominator == 0:
        return {"mean": float("nan"), "se": float("nan"), "low": float("nan"), "high": float("nan"), "n": n}
    value = float(moved.mean()) / denominator
    if n > 1:
        cov = np.cov(np.stack([moved, effect]), ddof=1) / n
        variance = (cov[0, 0] - 2 * value * cov[0, 1] + value**2 * cov[1, 1]) / denominator**2
        se = float(math.sqrt(max(variance, 0.0)))
        half = t_quantile(n) * se
    else:
        se, half = float("nan"), float("nan")
    return {"mean": value, "se": se, "low": value - half, "high": value + half, "n": n}


def retrain_range(retrain: Sequence[float]) -> dict[str, float]:
    """The retrained models' range (min, max) and mean over seeds."""
    (r,) = _clean(retrain)
    if not len(r):
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan")}
    return {"min": float(r.min()), "max": float(r.max()), "mean": float(r.mean())}


def within(value: float, span: dict[str, float]) -> bool:
    """Whether ``value`` lies inside the retrained models' [min, max]."""
    return bool(span["min"] <= value <= span["max"])
