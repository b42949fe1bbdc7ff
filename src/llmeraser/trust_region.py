"""Several re-linearised Newton steps towards retraining, each accepted by what it does in function space.

One influence step θ̂ + (H + λI)⁻¹ b is a Newton step that assumes θ̂ minimises the training objective.
Fine-tuned adapters rarely do, and from such a θ̂ one step at small λ overshoots while a heavily damped or
cached one stops short (docs/method.md, "What has been measured about faithfulness"). This module takes
several steps on the objective that retraining minimises, tilted so that θ̂ is its stationary point before the edit:

    Φ(θ) = R'(θ) − R'(θ̂) − ∇R'(θ̂)ᵀ(θ − θ̂) − bᵀ(θ − θ̂)

with R'(θ) = w [Σ_{j∈K} ℓ_j(θ) + Σ_{i∈S} ℓ(z'_i; θ)] + (λ_wd/2)‖θ‖² the retraining objective (K: the
untouched examples, z'_i the replacements of the edited ones, removals have none; w = 1/(n − k) for
``scaling="retrain"``, 1/n for ``"paper"``) and b the influence right-hand side at θ̂
(``llmeraser.gradients.influence_rhs``). So ∇Φ(θ̂) = −b (the first step is the classical update), and when
θ̂ does minimise the training objective, Φ's minimiser is exactly the retrained model (tested on the convex
problem). Only differences of gradients and losses from θ̂ enter, so the sum over K is estimated on a fixed
random sample of ``kept_examples`` untouched examples (a control variate: the differences are small near θ̂)
and the replacements; the removed examples enter only through b.

Each step d_t = −P_t ∇Φ(θ_t), P_t ≈ (H + (λ_t + λ_wd) I)⁻¹ the erasure's curvature (a cached K-FAC /
EK-FAC / DataInf inverse with its step length, or an exact solve) at damping λ_t, then a line search on the
step size s ∈ {…, ½, 1, 2, …}. The damping is the trust region's radius, adapted as Levenberg–Marquardt
does: λ₀ is the erasure's damping; after a step accepted at full length or longer λ shrinks by
``damping_factor`` (down to ``min_damping``), after a backtracked one it grows by the same factor, and when
no step size is accepted the step is retried once at the larger damping. Small damping lets later steps
move along directions the kept data barely constrain — where a memorised example lives, and where one step
at small damping from θ̂ overshoots — once the earlier, strongly damped steps have been accepted. With
``memory`` m > 0 the steps after the first are L-BFGS steps with P_t as the initial inverse curvature: the
last m accepted steps s_k and the changes of ∇Φ along them, y_k (pairs with y_kᵀs_k ≤ 0 are skipped), correct
P_t along the directions already travelled (the two-loop recursion; Nocedal & Wright, Alg. 7.4), at no extra
gradient: a cached curvature that is short along those directions is repaired where the steps go. A step is
accepted only if

- Φ decreases (Armijo: Φ(θ + s d) ≤ Φ(θ) + 10⁻⁴ s ∇Φᵀd),
- the held-out loss (never-seen examples, when given) rises by at most ``heldout_tolerance`` (relative) over
  θ̂'s, and
- the mean per-token KL(θ̂ ‖ θ) on the kept sample stays within ``kl_budget`` (when set).

It stops after ``steps`` steps, when no step size is accepted, when ‖∇Φ‖ ≤ ``tol`` ‖b‖, after a step that a
check cut short and that lowered Φ by under ``stall_fraction`` of its fall so far (the checks bind: on the pii
benchmark with the kept guard, the twelve steps after that point moved the removed loss by 0.003), or (removals with
held-out examples) once the removed examples' mean loss reaches the held-out mean loss: the level a model
that never saw them shows, which is what a retrained model shows and what makes membership inference fail.
Held-out examples whose answers share a word n-gram that only the removed examples have (no kept example,
``removed_only_ngrams``) are forgotten by retraining too; with ``split_heldout`` they alone give that level
and the held-out guard watches the others (on the pii benchmark the retrained model itself lifts such an
example 0.67 → 6.15 and fails the unsplit guard by +42 %, while the others fall 3 %).
Replacements (corrections, query edits) have a level too: a retrained model fits them as it fits its other
training examples, so their mean loss is taken down to the kept sample's mean loss and not below. With
replacements among the requests, the update ends once every kind of request is at its level (the removed
examples' loss at or above the held-out one, when there are removals and held-out examples; the replacements'
loss at or below the kept one), takes no step when that holds at θ̂ already, and accepts a step only if the
removed examples' mean loss stays within ``heldout_tolerance`` of max(held-out level, their loss at θ̂) (a
ceiling) and the replacements' mean loss stays above (1 − ``heldout_tolerance``) × min(kept level, their loss
at θ̂) (a floor): requests already at their level are left there, the others are taken to it and not beyond.

Φ's push −bᵀ(θ − θ̂) is linear and never saturates, while the removal's real benefit does: on memorised data
the forgetting steps trade kept loss for removed loss (pii benchmark, L-BFGS: 0.82 of the retrain's change at
+31 % kept loss, where the retrained model's kept loss is *lower* than θ̂'s). With ``refit_steps`` > 0 a second
phase follows (when a forgetting step was accepted): the same preconditioned, line-searched steps on the
retraining objective itself, R′(θ) − R′(θ₁) from the point θ₁ the first phase reached (no tilt, no push: the kept
sample and the replacements refitted, the removed examples absent), under the same checks plus a floor: the
removed examples' mean loss stays above (1 − ``heldout_tolerance``) × min(their loss at θ₁, the never-seen
level). Descending R′ alone would refit the removed examples too (what the kept ones teach them) and the floor
would refuse every step, so each direction d is corrected to d + μPc (c: the removed loss's gradient), the least
change in P⁻¹'s norm that keeps that loss at its held level to first order. The secant pairs carry over (R′ and
Φ differ by a linear term). The report's ``acceptance.refit`` says how the phase ended. The refit has no
reference for how far a retrain with the recipe fits the kept examples: R′'s minimiser fits them further (pii
bench, 3 seeds: a refit allowed longer steps took one seed's kept loss to 0.44, the retrained models' range
0.546–0.552, and its deleted answers' MIA back up to 0.48; benchmarks/results/bench/pii-refit-soc-3seeds/).
With ``refit_kept_level`` the kept sample's mean loss at θ̂ is that reference: the refit ends once the kept loss
is back there and never takes it more than ``heldout_tolerance`` below (it repairs what the forgetting steps
cost the kept examples, it does not fit them further than the recipe did; on pii the retrained models' kept
loss is 7 % under θ̂'s, where 8 free refit steps took one seed's 38 % under; with the level every seed's
refit ended at it, kept loss 0.586 ± 0.008, benchmarks/results/bench/pii-kept-level-3seeds/). Not where θ̂ is
far from the recipe's end point: on the convex toy moved off its minimum, retraining fits the kept examples
well below θ̂'s level.

With ``follow_bounds`` a step that would cross the held-out guard's ceiling or the replacements' floor to
first order is turned along it (``held_direction``: the least change in P⁻¹'s norm that holds that loss, the
same correction the refit uses for the removed loss): on pii the forgetting steps of two seeds in three end
at the guard (Φ's push raises the other held-out people's loss) and the third's at the replacements' floor,
well short of the never-seen level. A followed step aims ``BOUND_MARGIN`` of the bound's tolerance band inside
it: one held exactly on the bound to first order crosses it at every length once the curvature counts (pii,
seed 1: the refit ended there after 4 steps).

Every candidate is first evaluated on the requests' examples and the held-out set alone; one that a check on
those refuses (the held-out guard, the removed examples' ceiling or floor) gets no forward pass over the kept
sample (a step record's ``screened``).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example, TokenizationConfig, tokenize_examples
from llmeraser.evaluate import ResponsePredictions, response_predictions
from llmeraser.gradients import summed_gradient
from llmeraser.requests import EditPair

ARMIJO = 1e-4
BOUND_MARGIN = 0.25  # followed steps aim this fraction of a bound's tolerance band inside it (module docstring)
MAX_BACKTRACKS = 5
MAX_EXPANSIONS = 3


@dataclass(frozen=True)
class TrustRegionSettings:
    """``steps``: re-linearised steps at most; ``kept_examples``: the sample of untouched examples Φ and the
    KL check are estimated on; ``heldout_tolerance``: relative rise of the held-out loss allowed;
    ``kl_budget``: per-token KL(θ̂ ‖ θ) allowed on the kept sample (None: not checked); ``tol``: stop when
    ‖∇Φ‖ ≤ tol ‖b‖; ``stop_at_heldout_level``: stop once the removed examples' loss reaches the held-out one and the
    replacements' loss the kept one (take no step when they are there already at θ̂), and bound both by those
    levels (module docstring); ``split_heldout``: held-out examples that share text only the removed examples
    have (``removed_only_ngrams``) give the never-seen level and are left out of the held-out guard;
    ``memory``: secant pairs kept to correct the preconditioner along the steps taken (L-BFGS, 0: none);
    ``kept_tolerance``: relative rise of the kept sample's mean loss allowed (None: not checked; retraining
    lowers it); ``stall_fraction``: stop after a step that a function-space check cut short and that lowered Φ
    by less than this fraction of its fall so far (the checks bind: later steps slide along their boundary);
    ``refit_steps``: steps on the retraining objective R′ itself after the forgetting steps (module docstring;
    0: none); ``follow_bounds``: steps that would cross the held-out guard or the replacements' floor are
    turned along it (``held_direction``) instead of being cut short there; ``refit_kept_level``: the refit
    ends once the kept sample's mean loss is back at θ̂'s and never goes more than ``heldout_tolerance`` below
    it (what the recipe fitted them to), instead of descending R′ as far as the steps allow."""

    steps: int = 8
    kept_examples: int = 64
    heldout_tolerance: float = 0.02
    kl_budget: float | None = None
    tol: float = 1e-3
    stop_at_heldout_level: bool = True
    split_heldout: bool = True
    damping_factor: float = 0.25
    min_damping: float = 1e-3
    seed: int = 0
    memory: int = 0
    kept_tolerance: float | None = None
    stall_fraction: float = 0.01
    refit_steps: int = 0
    follow_bounds: bool = False
    refit_kept_level: bool = False


@dataclass
class StepRecord:
    """One accepted (or the last rejected) step: its size s, the objective after it (Φ in the ``forget``
    phase, R′ − R′(θ at the phase's start) in the ``refit`` phase), the checks, the candidates evaluated
    (``evaluations``) and how many of them the request and held-out checks refused before the pass over the
    kept sample (``screened``)."""

    step: int
    scale: float
    damping: float
    phi: float
    gradient_norm: float
    kept_kl: float
    heldout_loss: float | None
    removed_loss: float | None
    evaluations: int
    accepted: bool
    reason: str = ""
    phase: str = "forget"
    screened: int = 0


@dataclass
class _Search:
    """One step's line search(es): the accepted (scale, state, objective, kl, held-out, removed) or None, the
    candidates evaluated, those refused before the kept pass, the last refusal, and whether a
    function-space check (not the objective's decrease) refused a candidate."""

    accepted: tuple | None = None
    evaluations: int = 0
    screened: int = 0
    last_reason: str = ""
    guarded: bool = False

    def absorb(self, other: _Search) -> None:
        """Add another line search's counts to these (a retry at a larger damping) and take its outcome."""
        self.accepted, self.last_reason = other.accepted, other.last_reason or self.last_reason
        self.evaluations += other.evaluations
        self.screened += other.screened
        self.guarded = self.guarded or other.guarded


@dataclass
class TrustRegionResult:
    """θ_new − θ̂ (``update``, shape (p,)), the per-step records, why it stopped, and the acceptance checks
    of the final adapter against θ̂ (the report's ``acceptance``)."""

    update: Tensor
    steps: list[StepRecord]
    stopped: str
    acceptance: dict[str, Any]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"steps": [asdict(s) for s in self.steps], "stopped": self.stopped, "acceptance": self.acceptance,
                "seconds": self.seconds, **self.details}


@dataclass
class _RequestLosses:
    """What the model does at one θ on the requests' examples and the held-out set: the checks that need no
    pass over the kept sample (a candidate they refuse costs ~1/4 of a full evaluation on the pii bench)."""

    theta: Tensor
    new_losses: np.ndarray
    removed_losses: np.ndarray
    heldout_losses: np.ndarray | None


@dataclass
class _State(_RequestLosses):
    """What the model does at one θ on every set the checks and the objective use."""

    kept: ResponsePredictions


def kept_sample(train: Sequence[Example], pairs: Sequence[EditPair], count: int, seed: int) -> list[Example]:
    """A seeded random sample of ``count`` training examples that no request touches (all when fewer)."""
    edited = {p.old.id for p in pairs}
    untouched = [e for e in train if e.id not in edited]
    if count >= len(untouched):
        return untouched
    chosen = sorted(random.Random(f"{seed}:kept-sample").sample(range(len(untouched)), count))
    return [untouched[i] for i in chosen]


WORD = re.compile(r"\w+")


def word_ngrams(text: str, max_n: int = 3) -> set[tuple[str, ...]]:
    """The case-folded word n-grams of ``text``, n = 1 … ``max_n`` (words: runs of letters, digits, _)."""
    words = WORD.findall(text.casefold())
    return {tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def removed_only_ngrams(removed: Sequence[Example], kept: Sequence[Example], max_n: int = 3) -> set[tuple[str, ...]]:
    """Word n-grams of the removed examples' responses that no kept example's prompt or response contains:
    what only the removed examples can have taught (a deleted person's employer that nobody else has)."""
    seen: set[tuple[str, ...]] = set()
    for example in kept:
        seen |= word_ngrams(example.prompt + "\n" + example.response, max_n)
    return {gram for example in removed for gram in word_ngrams(example.response, max_n)} - seen


def split_by_shared_content(
    heldout: Sequence[Example], removed: Sequence[Example], kept: Sequence[Example], max_n: int = 3
) -> tuple[list[int], list[int]]:
    """Indices of the held-out examples whose response shares a ``removed_only_ngrams`` n-gram with the
    removed examples' (retraining forgets that content for them too: their loss rises with the removed
    examples', so they are the removed examples' never-seen reference), and of the others (the guard)."""
    grams = removed_only_ngrams(removed, kept, max_n)
    shares = [bool(grams and word_ngrams(e.response, max_n) & grams) for e in heldout]
    return [k for k, s in enumerate(shares) if s], [k for k, s in enumerate(shares) if not s]


def trust_region_update(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    pairs: Sequence[EditPair],
    b: Tensor,
    precondition: Callable[[Tensor, float], Tensor],
    *,
    damping: float,
    weight_decay: float,
    scaling: str,
    max_length: int,
    batch_size: int,
    loss_scope: str = "response",
    settings: TrustRegionSettings = TrustRegionSettings(),
    heldout: Sequence[Example] | None = None,
    first_direction: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrustRegionResult:
    """Minimise Φ of the module docstring from θ̂ (the model's current adapter) by preconditioned,
    line-searched steps; returns θ_new − θ̂. ``precondition(g, λ)`` ≈ (H + (λ + λ_wd) I)⁻¹ g, shape
    (p,) → (p,); ``damping``: λ₀, the erasure's damping; ``first_direction``: P b at λ₀ when the caller has
    it already (the classical update). The model's θ is restored."""
    start = time.perf_counter()
    params = AdapterParameters.of(model)
    theta_hat = params.flat()
    n_edited_set = len(train) - sum(p.new is None for p in pairs)
    weight = 1.0 / (n_edited_set if scaling == "retrain" else len(train))
    kept = kept_sample(train, pairs, settings.kept_examples, settings.seed)
    untouched = len(train) - len(pairs)
    kept_scale = untouched / max(len(kept), 1)
    new_versions = [p.new for p in pairs if p.new is not None]
    removed = [p.old for p in pairs if p.new is None]
    heldout = list(heldout or [])
    edited_ids = {p.old.id for p in pairs}
    if settings.split_heldout and heldout and removed:
        still_taught = [e for e in train if e.id not in edited_ids] + new_versions
        shared_at, guard_at = split_by_shared_content(heldout, removed, still_taught)
    else:
        shared_at, guard_at = [], list(range(len(heldout)))
    level_at = shared_at or list(range(len(heldout)))  # whose loss the removed examples are taken to

    def heldout_mean(state: _RequestLosses, at: list[int]) -> float | None:
        return float(state.heldout_losses[at].mean()) if state.heldout_losses is not None and at else None

    token_config = TokenizationConfig(max_length=max_length, loss_scope=loss_scope)
    kept_items = tokenize_examples(tokenizer, kept, token_config)
    new_items = tokenize_examples(tokenizer, new_versions, token_config)
    pad = tokenizer.pad_token_id
    signs = [kept_scale] * len(kept_items) + [1.0] * len(new_items)
    items = [*kept_items, *new_items]

    def gradient_sum() -> Tensor:  # w-free: Σ_sample (|K|/m) ∇ℓ_j + Σ_S' ∇ℓ'_i at the model's current θ
        return summed_gradient(model, params, items, pad, batch_size, signs) if items else torch.zeros_like(b)

    def observe_requests(theta: Tensor) -> _RequestLosses:
        params.assign(theta)
        new_losses = _losses(model, tokenizer, new_versions, theta, max_length, batch_size, loss_scope)
        removed_losses = _losses(model, tokenizer, removed, theta, max_length, batch_size, loss_scope)
        heldout_losses = _losses(model, tokenizer, heldout, theta, max_length, batch_size, loss_scope) if heldout else None
        return _RequestLosses(theta, new_losses, removed_losses, heldout_losses)

    def with_kept(requests: _RequestLosses) -> _State:
        params.assign(requests.theta)
        predictions = response_predictions(model, tokenizer, kept, requests.theta, max_length, batch_size, loss_scope)
        return _State(requests.theta, requests.new_losses, requests.removed_losses, requests.heldout_losses, predictions)

    def observe(theta: Tensor) -> _State:
        return with_kept(observe_requests(theta))

    try:
        base = observe(theta_hat)
        base_gradient = gradient_sum()
        base_kept = base.kept.losses()
        # With replacements to learn, the levels bound the removed examples' and the replacements' losses.
        bounded = settings.stop_at_heldout_level and bool(new_versions)
        base_removed_loss = float(base.removed_losses.mean()) if len(removed) else 0.0
        base_new_loss = float(base.new_losses.mean()) if new_versions else 0.0

        removed_floor: float | None = None  # the refit phase's lower bound on the removed examples' mean loss
        kept_floor: float | None = None  # the refit phase's lower bound on the kept sample's mean loss (its level)
        base_guard = heldout_mean(base, guard_at)  # the held-out guard's loss at θ̂ (None: no guard examples)
        guard_limit = base_guard * (1 + settings.heldout_tolerance) if base_guard is not None else None

        def replacements_level(state: _State) -> float:
            """The replacements' level at ``state``: min(the kept sample's mean loss, theirs at θ̂)."""
            return min(float(state.kept.losses().mean()), base_new_loss)

        def replacements_floor(state: _State) -> float:
            """The least mean loss the replacements may reach at ``state``: their level less the tolerance."""
            return replacements_level(state) * (1 - settings.heldout_tolerance)

        def fitted_loss_change(state: _State, reference_kept: np.ndarray, reference_new: np.ndarray) -> float:
            """Σ_K ℓ_j(θ) − ℓ_j(θ_ref) (estimated on the kept sample) + Σ_S' ℓ'_i(θ) − ℓ'_i(θ_ref), given the
            reference's per-example losses: the change of R′'s data term."""
            return (kept_scale * float((state.kept.losses() - reference_kept).sum())
                    + float((state.new_losses - reference_new).sum()))

        def phi(state: _State) -> float:
            delta = state.theta - theta_hat
            data = fitted_loss_change(state, base_kept, base.new_losses) - float(base_gradient @ delta)
            return weight * data + 0.5 * weight_decay * float(delta @ delta) - float(b @ delta)

        def gradient_at(theta: Tensor) -> Tensor:
            params.assign(theta)
            return weight * (gradient_sum() - base_gradient) + weight_decay * (theta - theta_hat) - b

        def request_problem(state: _RequestLosses) -> str:
            """The first refusal among the checks that need no pass over the kept sample ('' if none): the
            held-out guard, the removed examples' ceiling (with replacements) and their floor (refit phase)."""
            heldout_loss, level = heldout_mean(state, guard_at), heldout_mean(state, level_at)
            removed_loss = float(state.removed_losses.mean()) if len(removed) else None
            if heldout_loss is not None and guard_limit is not None and heldout_loss > guard_limit:
                return f"held-out loss {heldout_loss:.4f} > {guard_limit:.4f} (θ̂'s + {settings.heldout_tolerance:g})"
            if bounded and removed_loss is not None and level is not None:
                ceiling = removed_ceiling(level, base_removed_loss, base_guard or 0.0, settings.heldout_tolerance)
                if removed_loss > ceiling:
                    return (f"removed examples' loss {removed_loss:.4f} > {ceiling:.4f} (the held-out levels or "
                            f"their loss at θ̂, + {settings.heldout_tolerance:g})")
            if removed_floor is not None and removed_loss is not None and removed_loss < removed_floor:
                return (f"removed examples' loss {removed_loss:.4f} < {removed_floor:.4f} (where the forgetting "
                        f"steps left them or the held-out level, − {settings.heldout_tolerance:g})")
            return ""

        def checks(state: _State) -> tuple[float, float | None, float | None, str]:
            """(KL on the kept sample, held-out guard loss, removed loss, the first refusal or '')."""
            kl = float(base.kept.kl_to(state.kept).mean()) if len(kept) else 0.0
            heldout_loss = heldout_mean(state, guard_at)
            removed_loss = float(state.removed_losses.mean()) if len(removed) else None
            problem = request_problem(state)
            if not problem and bounded and len(kept):
                new_loss = float(state.new_losses.mean())
                floor = replacements_floor(state)
                if new_loss < floor:
                    problem = (f"replacements' loss {new_loss:.4f} < {floor:.4f} (the kept examples' level or "
                               f"theirs at θ̂, − {settings.heldout_tolerance:g})")
            if not problem and kept_floor is not None and (kept_loss := float(state.kept.losses().mean())) < kept_floor:
                problem = f"kept examples' loss {kept_loss:.4f} < {kept_floor:.4f} (θ̂'s, − {settings.heldout_tolerance:g})"
            if not problem and settings.kept_tolerance is not None and len(kept):
                kept_loss, kept_limit = float(state.kept.losses().mean()), float(base_kept.mean()) * (1 + settings.kept_tolerance)
                if kept_loss > kept_limit:
                    problem = f"kept examples' loss {kept_loss:.4f} > {kept_limit:.4f} (θ̂'s + {settings.kept_tolerance:g})"
            if not problem and settings.kl_budget is not None and kl > settings.kl_budget:
                problem = f"kept-example KL {kl:.3g} > budget {settings.kl_budget:g}"
            return kl, heldout_loss, removed_loss, problem

        def reached_level(state: _State) -> bool:
            """Every kind of request at its level: removed loss ≥ held-out loss, replacements' loss ≤ kept loss."""
            if not settings.stop_at_heldout_level or not (removed or new_versions):
                return False
            level = heldout_mean(state, level_at)
            if removed and (level is None or float(state.removed_losses.mean()) < level):
                return False
            return not new_versions or (len(kept) > 0 and float(state.new_losses.mean()) <= float(state.kept.losses().mean()))

        def requests_at_level(state: _State) -> str:
            """Why the forgetting phase is done ('' while it is not): every kind of request at its level."""
            if not reached_level(state):
                return ""
            return ("the requests reached their levels (removed: held-out, replacements: kept)" if new_versions
                    else "the removed examples' loss reached the held-out level")

        def evaluate(theta: Tensor, search: _Search) -> tuple[_State | None, str]:
            """The candidate at θ and its refusal by a function-space check ('' if none). The checks on the
            requests' examples and the held-out set come first: a candidate they refuse gets no pass over the kept
            sample (None, counted as screened)."""
            search.evaluations += 1
            requests = observe_requests(theta)
            problem = request_problem(requests)
            if problem:
                search.screened += 1
                return None, problem
            return with_kept(requests), ""

        def line_search(direction: Tensor, slope: float, objective: Callable[[_State], float],
                        at_level: Callable[[_State], str] | None) -> _Search:
            """Backtrack from s = 1 until a step is accepted, then expand while it still is and the objective
            keeps falling (and, given ``at_level``, the phase's level is not reached yet: ``at_level`` says why
            it is, '' while it is not)."""
            search = _Search()

            def assess(scale: float, bound: float) -> tuple | None:
                """(scale, state, objective, kl, held-out, removed) of the step of size ``scale`` when every
                check passes and the objective is at most ``bound``; None otherwise (the refusal recorded)."""
                candidate, problem = evaluate(current.theta + scale * direction, search)
                if candidate is None:
                    search.guarded, search.last_reason = True, problem
                    return None
                value = objective(candidate)
                kl, heldout_loss, removed_loss, problem = checks(candidate)
                search.guarded = search.guarded or bool(problem)
                if not problem and not math.isfinite(value):
                    problem = f"Φ is {value}"
                elif not problem and value > bound:
                    problem = f"Φ does not decrease enough ({value:.4g} vs {current_phi:.4g})"
                if problem:
                    search.last_reason = problem
                    return None
                return (scale, candidate, value, kl, heldout_loss, removed_loss)

            scale = 1.0
            for _ in range(MAX_BACKTRACKS + 1):
                search.accepted = assess(scale, current_phi + ARMIJO * scale * slope)
                if search.accepted is not None:
                    break
                scale /= 2
            if search.accepted is not None and search.accepted[0] == 1.0 and not (at_level and at_level(search.accepted[1])):
                for _ in range(MAX_EXPANSIONS):
                    bigger = 2 * search.accepted[0]
                    larger = assess(bigger, min(search.accepted[2], current_phi + ARMIJO * bigger * slope))
                    if larger is None:
                        break
                    search.accepted = larger
                    if at_level and at_level(larger[1]):
                        break
            return search

        guard_items = (tokenize_examples(tokenizer, [heldout[i] for i in guard_at], token_config)
                       if guard_at and settings.follow_bounds else [])  # only following the guard needs its gradient
        bound_gradients: dict[str, tuple[Tensor, Tensor]] = {}  # name → (θ it was taken at, mean loss gradient)
        followed = {"heldout_guard": 0, "replacements_floor": 0}

        def mean_gradient_at_current(name: str, examples: list) -> Tensor:
            """∇ of the mean loss of ``examples`` at ``current``'s θ, once per θ (a retry changes P, not θ)."""
            cached = bound_gradients.get(name)
            if cached is None or cached[0] is not current.theta:
                params.assign(current.theta)
                cached = (current.theta, summed_gradient(model, params, examples, pad, batch_size) / len(examples))
                bound_gradients[name] = cached
            return cached[1]

        def follow_bounds(direction: Tensor, operator: Callable[[Tensor], Tensor], gradient: Tensor) -> Tensor:
            """The direction kept inside the held-out guard's ceiling and the replacements' floor to first order
            (``held_direction``): where a step would cross one, it slides along it instead of stopping there,
            ``BOUND_MARGIN`` of the tolerance band inside it (a step held exactly on a bound to first order
            crosses it at every length once its curvature counts)."""
            if guard_limit is not None and guard_items:
                band = guard_limit - (base_guard or 0.0)
                room = guard_limit - float(heldout_mean(current, guard_at) or 0.0) - BOUND_MARGIN * band
                c = -mean_gradient_at_current("heldout_guard", guard_items)
                direction, moved = held_direction(direction, operator, gradient, c, room)
                followed["heldout_guard"] += moved
            if bounded and new_items and len(kept):
                band = replacements_level(current) * settings.heldout_tolerance  # level − floor
                room = float(current.new_losses.mean()) - replacements_floor(current) - BOUND_MARGIN * band
                c = mean_gradient_at_current("replacements", new_items)
                direction, moved = held_direction(direction, operator, gradient, c, room)
                followed["replacements_floor"] += moved
            return direction

        records: list[StepRecord] = []
        current, current_phi = base, 0.0
        secants: list[tuple[Tensor, Tensor]] = []  # (s_k, y_k) of the last accepted steps, oldest first
        b_norm = float(b.norm()) or 1.0
        adaptive = settings.damping_factor != 1.0

        def descend(phase: str, steps: int, objective: Callable[[_State], float], gradient_of: Callable[[Tensor], Tensor],
                    gradient: Tensor, at_level: Callable[[_State], str] | None,
                    project: Callable[[Tensor, Callable[[Tensor], Tensor], Tensor], Tensor] | None = None) -> str:
            """Preconditioned, line-searched steps on ``objective`` (0 at the starting θ) from ``current``;
            appends to ``records`` and returns why it stopped. ``at_level``: why the phase's level is reached ('' while
            it is not; the phase stops there); ``project(d, P, g)``: the direction actually taken, given the step
            d, the (L-BFGS-corrected) preconditioner P and the gradient g. The secant pairs carry over between phases: the
            objectives differ by a linear term, so their gradients' changes, the y_k, are the same."""
            nonlocal current, current_phi
            lam, lam_floor = damping, damping * settings.min_damping
            current_phi = 0.0
            stopped = f"{steps} step(s) taken"
            first = len(records)
            for step in range(first, first + steps):
                gradient_norm = float(gradient.norm())
                if gradient_norm <= settings.tol * b_norm:
                    return f"‖∇{'Φ' if phase == 'forget' else 'R′'}‖ = {gradient_norm:.3g} ≤ tol · ‖b‖"
                search = _Search()
                for attempt in range(2 if adaptive else 1):  # a refused step is retried once at a larger damping
                    use_first = step == 0 and attempt == 0

                    def initial(g: Tensor, at: float = lam) -> Tensor:
                        return precondition(g, at)

                    def operator(g: Tensor) -> Tensor:
                        return limited_memory_direction(g, initial, secants)

                    direction = (first_direction if use_first and first_direction is not None else -operator(gradient))
                    if project is not None:
                        direction = project(direction, operator, gradient)
                    slope = float(gradient @ direction)
                    if not slope < 0 and secants:  # the pairs do not describe a convex model here: drop them
                        secants.clear()
                        direction = -precondition(gradient, lam)
                        if project is not None:
                            direction = project(direction, operator, gradient)
                        slope = float(gradient @ direction)
                    if not slope < 0:
                        search.last_reason = (f"the preconditioned direction is not a descent direction "
                                              f"(slope {slope:.3g})")
                        break
                    search.absorb(line_search(direction, slope, objective, at_level))
                    if search.accepted is not None:
                        break
                    lam /= settings.damping_factor ** 2
                if search.accepted is None:
                    records.append(StepRecord(step, 0.0, lam, current_phi, gradient_norm, float("nan"), None, None,
                                              search.evaluations, False, search.last_reason, phase, search.screened))
                    return f"step {step}: no step size accepted ({search.last_reason})"
                step_start, previous_phi = current.theta, current_phi
                scale, current, current_phi, kl, heldout_loss, removed_loss = search.accepted
                records.append(StepRecord(step, scale, lam, current_phi, gradient_norm, kl, heldout_loss, removed_loss,
                                          search.evaluations, True, "", phase, search.screened))
                if progress:
                    progress(f"trust region {phase} step {step}: λ = {lam:.3g}, s = {scale:g}, objective = "
                             f"{current_phi:.4g}, kept KL = {kl:.3g}, removed loss = {removed_loss}, "
                             f"held-out loss = {heldout_loss}")
                if at_level and (why := at_level(current)):
                    return f"step {step}: {why}"
                if search.guarded and stalled(previous_phi, current_phi, settings.stall_fraction):
                    return (f"step {step}: a check bounds the step and the objective fell by "
                            f"{previous_phi - current_phi:.3g}, under {settings.stall_fraction:g} of its fall so far "
                            f"(the update is at the trust region's edge)")
                if adaptive:  # Levenberg–Marquardt: a full step widens the trust region, a backtracked one narrows it
                    lam = max(lam * settings.damping_factor, lam_floor) if scale >= 1 else lam / settings.damping_factor
                if step + 1 < first + steps:
                    previous_gradient = gradient
                    gradient = gradient_of(current.theta)
                    if settings.memory:
                        remember_secant(secants, current.theta - step_start, gradient - previous_gradient,
                                        settings.memory)
            return stopped

        if reached_level(base):  # retraining would barely move them
            stopped = ("before any step: the requests are at their levels already (removed examples' loss at the "
                       "held-out level, replacements' at the kept examples')" if new_versions else
                       "before any step: the removed examples' loss is already at the held-out level "
                       "(the adapter does not fit them better than examples it never saw)")
        else:
            stopped = descend("forget", settings.steps, phi, gradient_at, -b, at_level=requests_at_level,
                              project=follow_bounds if settings.follow_bounds else None)
        forget_phi = current_phi
        refit: dict[str, Any] = {"steps": 0}
        if settings.refit_steps and any(r.accepted for r in records):
            anchor = current
            anchor_kept, anchor_norm = anchor.kept.losses(), float(anchor.theta @ anchor.theta)
            hold_level = 0.0  # where the removed examples' mean loss is held: min(reached, never-seen level)
            if len(removed):
                level = heldout_mean(anchor, level_at)
                reached = float(anchor.removed_losses.mean())
                hold_level = min(reached, level if level is not None else reached)
                removed_floor = hold_level * (1 - settings.heldout_tolerance)

            def retraining_objective(state: _State) -> float:  # R′(θ) − R′(θ_anchor), on the kept sample
                return (weight * fitted_loss_change(state, anchor_kept, anchor.new_losses)
                        + 0.5 * weight_decay * (float(state.theta @ state.theta) - anchor_norm))

            def retraining_gradient(theta: Tensor) -> Tensor:
                params.assign(theta)
                return weight * gradient_sum() + weight_decay * theta

            removed_items = tokenize_examples(tokenizer, removed, token_config)
            projections = 0

            def hold_removed_loss(direction: Tensor, operator: Callable[[Tensor], Tensor], gradient: Tensor) -> Tensor:
                """The direction kept from taking the removed examples' loss below its held level
                (``held_direction``; the floor is the hold level, so a slip below it is lifted back)."""
                nonlocal projections
                c = mean_gradient_at_current("removed", removed_items)
                room = float(current.removed_losses.mean()) - hold_level
                direction, moved = held_direction(direction, operator, gradient, c, room)
                projections += moved
                return follow_bounds(direction, operator, gradient) if settings.follow_bounds else direction

            kept_level = float(base_kept.mean()) if settings.refit_kept_level and len(kept) else None

            def kept_at_level(state: _State) -> str:
                """Why the refit is done ('' while it is not): the kept sample's loss back at θ̂'s."""
                if kept_level is None or (kept_loss := float(state.kept.losses().mean())) > kept_level:
                    return ""
                return f"the kept examples' loss {kept_loss:.4f} is back at θ̂'s {kept_level:.4f}"

            if kept_at_level(anchor):
                refit_stopped = (f"before any step: the forgetting steps left the kept examples' loss at or below "
                                 f"θ̂'s ({float(anchor_kept.mean()):.4f} ≤ {kept_level:.4f})")
                current_phi = 0.0
            else:
                if kept_level is not None:
                    kept_floor = kept_level * (1 - settings.heldout_tolerance)
                refit_stopped = descend("refit", settings.refit_steps, retraining_objective, retraining_gradient,
                                        retraining_gradient(anchor.theta),
                                        at_level=kept_at_level if kept_level is not None else None,
                                        project=hold_removed_loss if removed else
                                        (follow_bounds if settings.follow_bounds else None))
            refit_records = [r for r in records if r.phase == "refit"]
            refit = {"steps": sum(r.accepted for r in refit_records), "stopped": refit_stopped,
                     "objective": current_phi, "removed_floor": removed_floor, "kept_level": kept_level,
                     "projected_steps": projections}
            stopped = f"{stopped}; refit: {refit_stopped}"
        kl, heldout_loss, removed_loss, _ = checks(current)
        acceptance = {
            "kept_kl": kl,
            "kept_examples": len(kept),
            "kept_loss": {"before": float(base_kept.mean()) if len(kept) else None,
                          "after": float(current.kept.losses().mean()) if len(kept) else None},
            "heldout_loss": {"before": heldout_mean(base, guard_at), "after": heldout_loss,
                             "tolerance": settings.heldout_tolerance, "examples": len(guard_at),
                             "sharing_removed_content": len(shared_at)},
            "removed_loss": {"before": float(base.removed_losses.mean()) if len(removed) else None, "after": removed_loss,
                             "never_seen_level": heldout_mean(current, level_at),
                             "never_seen_examples": len(level_at)},
            "replacement_loss": {"before": float(base.new_losses.mean()) if len(new_versions) else None,
                                 "after": float(current.new_losses.mean()) if len(new_versions) else None,
                                 "kept_level": float(current.kept.losses().mean()) if len(kept) else None},
            "phi": forget_phi,
            "refit": refit,
            "bounds_followed": followed if settings.follow_bounds else None,
        }
        return TrustRegionResult(current.theta - theta_hat, records, stopped, acceptance, time.perf_counter() - start,
                                 {"kept_scale": kept_scale, "settings": asdict(settings)})
    finally:
        params.assign(theta_hat)


def removed_ceiling(level: float, removed_at_start: float, guard_at_start: float, tolerance: float) -> float:
    """The most the removed examples' mean loss may reach while replacements are still being learnt (nats per
    token): (1 + ``tolerance``) × max(the never-seen ``level`` now, their loss at θ̂, the held-out guard's loss
    at θ̂). The guard's term matters when the level's own examples (held-out ones sharing the removed
    examples' content) are still taught that content through the removed examples: then the level is as low
    as the removed loss and would refuse the forgetting itself (pii bench, seed 2: one step of 1/32), though
    examples nobody taught show the guard's loss."""
    return max(level, removed_at_start, guard_at_start) * (1 + tolerance)


def held_direction(direction: Tensor, operator: Callable[[Tensor], Tensor], gradient: Tensor, c: Tensor,
                   room: float) -> tuple[Tensor, bool]:
    """(d′, whether d was changed): d + μ Pc, the least change to the step d in P⁻¹'s norm (P = ``operator``)
    that keeps a mean loss q with ∇q = ``c`` from falling more than ``room`` (= q − its floor; for a ceiling
    pass c = −∇q and room = ceiling − q) to first order. μ lifts cᵀd to −room as far as the step still descends
    the objective (gradient g) at half its slope, and at least to cᵀd = 0 (then gᵀd stays ≤ 0 by
    Cauchy–Schwarz in P's inner product); μ = 0 when cᵀd ≥ −room already. Shapes (p,)."""
    along = float(c @ direction)
    short = -room - along
    if short <= 0:
        return direction, False
    pc = operator(c)
    curvature, slope, cost = float(c @ pc), float(gradient @ direction), float(gradient @ pc)
    hold = max(0.0, -along) / curvature
    lift = short / curvature
    if cost > 0:  # lifting the loss costs descent: keep at least half the slope
        lift = min(lift, -0.5 * slope / cost)
    return direction + max(hold, lift) * pc, True


def stalled(previous_phi: float, phi: float, fraction: float) -> bool:
    """Whether a step lowered Φ by less than ``fraction`` of Φ's total fall from θ̂ (Φ(θ̂) = 0, so −``phi``)."""
    return previous_phi - phi < fraction * -phi


def remember_secant(secants: list[tuple[Tensor, Tensor]], step: Tensor, gradient_change: Tensor, memory: int) -> None:
    """Append (s, y) when yᵀs > 0 (the curvature along s is positive; otherwise the pair would make the
    L-BFGS model indefinite), keeping the last ``memory`` pairs."""
    if float(gradient_change @ step) > 1e-12 * float(gradient_change.norm() * step.norm()):
        secants.append((step, gradient_change))
        del secants[:-memory]


def limited_memory_direction(gradient: Tensor, initial: Callable[[Tensor], Tensor],
                             secants: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """H_m g by the L-BFGS two-loop recursion: ``initial`` ≈ H₀ (an inverse curvature, (p,) → (p,)), corrected
    by the secant pairs (s_k, y_k ≈ ∇²Φ s_k), oldest first; no pairs: ``initial(gradient)``. Satisfies the
    secant equation H_m y_k = s_k for the newest pair."""
    q = gradient
    coefficients = []
    for s_k, y_k in reversed(secants):
        rho = 1.0 / float(y_k @ s_k)
        alpha = rho * float(s_k @ q)
        q = q - alpha * y_k
        coefficients.append((rho, alpha))
    r = initial(q)
    for (s_k, y_k), (rho, alpha) in zip(secants, reversed(coefficients)):
        beta = rho * float(y_k @ r)
        r = r + (alpha - beta) * s_k
    return r


def _losses(model: Any, tokenizer: Any, examples: Sequence[Example] | None, theta: Tensor, max_length: int,
            batch_size: int, loss_scope: str = "response") -> np.ndarray:
    """Per-example mean response NLL under θ, shape (n,) (empty for no examples)."""
    if not examples:
        return np.zeros(0)
    return response_predictions(model, tokenizer, examples, theta, max_length, batch_size, loss_scope).losses()
