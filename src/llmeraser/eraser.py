"""The eraser: from requests to a new adapter, by one influence-function step.

    pairs = resolve(requests, train)                      (aligned old/new versions)
    b     = c Σ [∇ℓ(old) − ∇ℓ(new)] (+ weight-decay term)  (llmeraser.gradients)
    v     = (H + λI)⁻¹ b                                   (llmeraser.curvature + llmeraser.solvers)
    θ_new = θ̂ + v

The input adapter is never modified: ``erase`` returns θ_new; ``save_erased_adapter`` writes it to a new
directory through a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmeraser.adapter import AdapterParameters, save_adapter
from llmeraser.curvature.calibration import StepCalibration, step_length
from llmeraser.curvature.inverse import CachedInverse
from llmeraser.curvature.operators import CurvatureOperator
from llmeraser.curvature.registry import CurvatureLayer, cache_method
from llmeraser.data import (
    Example,
    LossScope,
    TokenizationConfig,
    TokenizedExample,
    TokenizedOnDemand,
    example_losses,
    iter_batches,
    tokenize_examples,
)
from llmeraser.distributed import is_distributed, shard, world_size
from llmeraser.errors import ConfigError, NumericalError
from llmeraser.gradients import influence_rhs
from llmeraser.hashing import adapter_hash
from llmeraser.options import option, validate
from llmeraser.requests import (
    EditPair,
    Request,
    affected_examples,
    count_by_kind,
    duplicates_report,
    edited_training_set,
    resolve,
)
from llmeraser.solvers import SolverName, SolverResult, solve
from llmeraser.trust_region import TrustRegionSettings, trust_region_update

CurvatureKind = Literal["gauss-newton", "hessian"]  # llmeraser.curvature.CURVATURE_KINDS
Scaling = Literal["retrain", "paper"]
CurvatureUse = Literal["precondition", "direct"]
DEFAULT_PROBE_EXAMPLES = 64  # probe_examples=None: the probe subset's size
DAMPING_FACTOR = 10.0  # auto_damping: λ × this per retry
MAX_DAMPING_ATTEMPTS = 4  # auto_damping: solves at most


@dataclass(frozen=True)
class EraseConfig:
    """How to compute the update.

    - ``solver``: direct | cg | lissa | sgd; ``curvature``: gauss-newton (PSD, default) | hessian.
    - ``damping`` λ added to H (besides the recipe's ``weight_decay`` λ_wd, which is part of H).
    - ``scaling``: "retrain" (Newton step to the retraining objective, 1/(n−k); default) or "paper" (1/n).
    - ``curvature_examples``: use a random subset of this many training examples for H (None: all).
    - ``max_length``, ``loss_scope``: tokenisation as in training (``llmeraser.data.TokenizationConfig``;
      the adapter's training record says them).
    - ``batch_size``: examples per forward pass, and the mini-batch of the stochastic solvers.
    - ``probe_examples``: size of the fixed probe subset on which stochastic solvers measure the residual
      and ``curvature_use="direct"`` fits its step length (None: ``DEFAULT_PROBE_EXAMPLES``). With a step
      length calibrated at fit time, direct uses that one and runs no exact product unless this is > 0
      (then it measures the residual of the calibrated step on that many examples).
    - ``diverge_after``: cg stops as diverged when its residual rises this many iterations in a row.
    - ``auto_damping``: when the solve fails numerically (diverges, meets non-positive curvature, ends
      worse than v = 0), retry with λ × ``damping_factor``, at most ``max_damping_attempts`` solves in
      all; every attempt is recorded in the report.
    - ``trust_region``: after the first solve, take up to ``trust_region_steps`` re-linearised steps on the
      retraining objective, each accepted by its effect in function space (``llmeraser.trust_region``):
      ``kept_examples`` untouched examples estimate the objective and the KL check (``kl_budget``, per
      token; None: not checked), held-out examples passed to ``erase`` bound the held-out loss's rise
      (``heldout_tolerance``, relative) and give the never-seen level the removed examples stop at, and
      ``kept_tolerance`` (None: not checked) bounds the rise of the kept examples' loss;
      the damping of each step adapts by ``trust_region_damping_factor`` (1: fixed at ``damping``);
      ``trust_region_memory`` secant pairs correct the curvature along the steps taken (L-BFGS; 0: none);
      ``trust_region_refit_steps`` steps on the retraining objective itself follow, the removed examples' loss
      held at its level (0: none); ``trust_region_follow_bounds``: steps that would cross the held-out guard
      or the replacements' floor are turned along it instead of cut short; ``trust_region_refit_kept_level``:
      the refit ends once the kept examples' loss is back at the original adapter's.
    """

    solver: SolverName = option("cg", help="inverse-HVP solver")
    curvature: CurvatureKind = option("gauss-newton", help="curvature matrix H")
    damping: float = option(1e-2, min=0.0, help="λ added to H (also a trust region for long steps)")
    scaling: Scaling = option("retrain", help="retrain: Newton step to the retraining objective, 1/(n-k); paper: 1/n")
    weight_decay: float = option(0.0, min=0.0, help="recipe's λ_wd")
    max_iters: int = option(50, min=1, help="solver iterations")
    tol: float = option(1e-4, gt=0.0, help="relative residual ‖(H+λI)v − b‖/‖b‖ to stop at")
    batch_size: int = option(8, min=1, help="examples per forward pass and stochastic mini-batch")
    curvature_examples: int | None = option(
        None, min=1, help="estimate H on a random subset of this many examples (default: all)")
    probe_examples: int | None = option(
        None, min=0, help=f"the probe subset on which `curvature_use=direct` fits α (default {DEFAULT_PROBE_EXAMPLES}) and "
        "lissa/sgd measure residuals; with a calibrated cache, N > 0 measures the calibrated step's residual on N examples "
        "(default: no exact product)")
    max_length: int = option(256, min=2, help="max tokens per example")
    loss_scope: LossScope = option("response", help="tokens that carry the loss")
    curvature_use: CurvatureUse = option(
        "precondition", help="precondition: cg or sgd against the exact operator, the cached curvature as "
        "preconditioner; direct: v = (K + λI)⁻¹ b, no iterations (fast, approximate), with the step length α "
        "calibrated by fit-curvature when its damping + weight decay equal this erasure's, else fitted on "
        "`probe_examples` examples")
    seed: int = option(0, help="seed of subsets and stochastic solvers")
    solver_options: dict[str, Any] = field(default_factory=dict)
    diverge_after: int = option(5, min=1, help="cg stops as diverged when its residual rises this many iterations in a row")
    auto_damping: bool = option(
        False, help=f"when the solve diverges or meets non-positive curvature, retry with {DAMPING_FACTOR:g}x the "
        f"damping (up to {MAX_DAMPING_ATTEMPTS} solves); each attempt is recorded in the report and the lineage")
    damping_factor: float = option(DAMPING_FACTOR, gt=0.0, help="`auto_damping`'s factor of λ per retry")
    max_damping_attempts: int = option(MAX_DAMPING_ATTEMPTS, min=1, help="`auto_damping`'s solves at most")
    trust_region: bool = option(False, help="re-linearised steps accepted by their effect in function space")
    trust_region_steps: int = option(TrustRegionSettings.steps, min=1, help="trust-region steps at most")
    kept_examples: int = option(
        TrustRegionSettings.kept_examples, min=1,
        help="untouched training examples the trust region estimates the objective and the KL on")
    heldout_tolerance: float = option(
        TrustRegionSettings.heldout_tolerance, min=0.0,
        help="relative rise of the held-out loss a trust-region step may cause")
    kept_tolerance: float | None = option(
        TrustRegionSettings.kept_tolerance, min=0.0,
        help="relative rise of the kept examples' loss a trust-region step may cause (default: not checked)")
    kl_budget: float | None = option(
        TrustRegionSettings.kl_budget, gt=0.0,
        help="per-token KL(original ‖ erased) allowed on the kept examples (default: not checked)")
    trust_region_damping_factor: float = option(
        TrustRegionSettings.damping_factor, gt=0.0, help="the trust region's damping adapts by this factor (1: fixed)")
    trust_region_memory: int = option(
        TrustRegionSettings.memory, min=0,
        help="secant pairs the trust region's steps remember (L-BFGS on the curvature; 0: none)")
    trust_region_refit_steps: int = option(
        TrustRegionSettings.refit_steps, min=0,
        help="after the forgetting steps, trust-region steps on the retraining objective itself (the kept examples "
        "refitted, the removed examples' loss held at its level; 0: none)")
    trust_region_refit_kept_level: bool = option(
        TrustRegionSettings.refit_kept_level,
        help="end the refit once the kept examples' loss is back at the original adapter's, and never take it more "
        "than the held-out tolerance below (what the recipe fitted them to), instead of descending as far as the "
        "steps allow")
    trust_region_follow_bounds: bool = option(
        TrustRegionSettings.follow_bounds,
        help="turn a trust-region step that would cross the held-out guard or the replacements' floor along it "
        "(first order) instead of cutting it short there")

    def __post_init__(self) -> None:
        validate(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ErasureResult:
    """θ̂, v and θ_new = θ̂ + v as flat (p,) vectors, the resolved pairs, solver diagnostics, the report,
    and the right-hand side b the update solves for, shape (p,)."""

    theta: Tensor
    update: Tensor
    pairs: list[EditPair]
    solver: SolverResult
    report: dict[str, Any]
    rhs: Tensor | None = None

    @property
    def theta_new(self) -> Tensor:
        return self.theta + self.update


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (plus the CUDA peak when on a GPU).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory.
    ``getrusage``'s ``ru_maxrss`` survives ``exec``: a command started from a large process (a benchmark, a
    notebook, a pipeline) would report its parent's peak. Elsewhere ``ru_maxrss`` (bytes on macOS)."""
    peak = _resident_high_water_mib()
    if torch.cuda.is_available():
        peak += torch.cuda.max_memory_allocated() / 2**20
    return peak


def _resident_high_water_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0


def _solver_options(
    config: EraseConfig, operator: CurvatureOperator, callback: Callable[[int, float], None] | None
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if config.solver in ("cg", "lissa", "sgd"):
        options.update(max_iters=config.max_iters, tol=config.tol, callback=callback)
    if config.solver == "cg":
        options.update(diverge_after=config.diverge_after)
    if config.solver in ("lissa", "sgd"):
        options.update(probe=probe_operator(config, operator), seed=config.seed)
    options.update(config.solver_options)
    return options


@torch.no_grad()
def _raise_on_nonfinite_losses(
    model: Any,
    old_items: Sequence[TokenizedExample],
    new_items: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int,
) -> None:
    """Raise ``NumericalError`` (stage 'losses') naming the first edited example whose loss is NaN/Inf."""
    for label, items in (("edited example (as in the training set)", old_items), ("replacement", new_items)):
        offset = 0
        for batch in iter_batches(items, batch_size, pad_token_id):
            losses = example_losses(model, batch)
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                index = offset + int(bad[0])
                raise NumericalError(
                    f"the loss of {label} #{index} is {float(losses[int(bad[0])])} "
                    "(NaN/Inf in the model's activations or the adapter's weights?)",
                    stage="losses",
                )
            offset += len(losses)


def _solve_once(
    config: EraseConfig,
    operator: CurvatureOperator,
    b: Tensor,
    progress: bool,
    curvature_cache: dict[str, CurvatureLayer] | None = None,
    calibration: StepCalibration | None = None,
) -> SolverResult:
    """One solve; raises ``NumericalError`` (stage 'solve') on divergence, non-positive curvature, NaN/Inf
    in v, or a result worse than v = 0 (relative residual > 1)."""
    cached_direct = curvature_cache is not None and config.curvature_use == "direct"
    bar = tqdm(total=config.max_iters, desc=f"solve ({config.solver}, λ={operator.damping:g})",
               disable=not progress or config.solver == "direct" or cached_direct, leave=False)

    def advance(iteration: int, residual: float) -> None:
        bar.update(iteration - bar.n)
        bar.set_postfix(residual=f"{residual:.2e}")

    try:
        if curvature_cache is None:
            result = solve(config.solver, operator, b, **_solver_options(config, operator, advance))
        else:
            inverse = CachedInverse(curvature_cache, operator.params, operator.shift)
            result = _solve_with_cache(config, operator, b, inverse, advance, calibration)
    except NumericalError as err:
        if err.stage not in (None, "solve"):
            raise
        raise NumericalError(f"{config.solver}: {err.message}", stage="solve") from None
    finally:
        bar.close()
    if result.status.startswith("diverged") or "non-positive curvature" in result.status:
        raise NumericalError(f"{config.solver} {result.status}", stage="solve")
    if not result.converged and result.final_residual > 1.0:
        raise NumericalError(
            f"{result.solver} ended with relative residual {result.final_residual:.3e} > 1 (worse than no update; "
            f"{result.status})",
            stage="solve",
        )
    return result


def _solve_with_damping(
    config: EraseConfig,
    operator_with: Callable[[float], CurvatureOperator],
    b: Tensor,
    progress: bool,
    curvature_cache: dict[str, CurvatureLayer] | None = None,
    calibration: StepCalibration | None = None,
) -> tuple[SolverResult, CurvatureOperator, float, list[dict[str, Any]]]:
    """Solve with λ = ``config.damping``; with ``auto_damping``, on a numerical failure of the solve
    retry with λ × ``damping_factor`` (at most ``max_damping_attempts`` solves). Returns the result, its
    operator, the λ used and the list of attempts ({damping, outcome, ...})."""
    damping, attempts = config.damping, []
    while True:
        operator = operator_with(damping)
        try:
            result = _solve_once(config, operator, b, progress, curvature_cache, calibration)
        except NumericalError as err:
            if err.stage != "solve":
                raise
            attempts.append({"damping": damping, "outcome": "failed", "error": err.message})
            suggestion = damping * config.damping_factor if damping > 0 else 1e-3
            if not config.auto_damping:
                raise NumericalError(
                    f"{err.message}; try a larger damping: `damping={suggestion:g}` (or `auto_damping=True`)", stage="solve"
                ) from None
            if len(attempts) >= config.max_damping_attempts:
                tried = ", ".join(f"{a['damping']:g}" for a in attempts)
                raise NumericalError(
                    f"{err.message}; auto-damping tried λ = {tried} without success "
                    f"(try `damping={suggestion:g}` or more, or `curvature=gauss-newton`)", stage="solve"
                ) from None
            damping = suggestion
            continue
        attempts.append({"damping": damping, "outcome": "ok", "status": result.status,
                         "iterations": result.iterations, "final_relative_residual": result.final_residual})
        return result, operator, damping, attempts


def prepare_erasure(
    tokenizer: Any, train: Sequence[Example], requests: Sequence[Request], config: EraseConfig
) -> tuple[list[EditPair], list[TokenizedExample], list[TokenizedExample], TokenizedOnDemand]:
    """Resolve the requests and tokenise what the erasure differentiates: ``(pairs, old versions, new
    versions, curvature examples)``. The curvature set is the edited training set ("retrain" scaling) or
    the original one ("paper"), subsampled to ``config.curvature_examples`` (seeded), and tokenised when
    first read (a calibrated direct solve never reads it)."""
    pairs = resolve(requests, train)
    token_config = TokenizationConfig(max_length=config.max_length, loss_scope=config.loss_scope)
    old_items = tokenize_examples(tokenizer, [p.old for p in pairs], token_config)
    new_items = tokenize_examples(tokenizer, [p.new for p in pairs if p.new is not None], token_config)
    curvature_set = edited_training_set(train, pairs) if config.scaling == "retrain" else list(train)
    if config.curvature_examples is not None and config.curvature_examples < len(curvature_set):
        curvature_set = curvature_sample(curvature_set, {p.old.id for p in pairs}, config.curvature_examples, config.seed)
    return pairs, old_items, new_items, TokenizedOnDemand(tokenizer, curvature_set, token_config)


def curvature_sample(examples: Sequence[Example], edited_ids: set[str], count: int, seed: int) -> list[Example]:
    """``count`` of ``examples`` for the curvature, in their order: every edited example among them (the
    replacements, for "retrain" scaling; the curvature must see what the edit changes), then a seeded random
    draw of the others."""
    must = [k for k, e in enumerate(examples) if e.id in edited_ids][:count]
    others = [k for k, e in enumerate(examples) if e.id not in edited_ids]
    generator = torch.Generator().manual_seed(seed)
    drawn = [others[i] for i in torch.randperm(len(others), generator=generator)[: count - len(must)].tolist()]
    return [examples[k] for k in sorted(must + drawn)]


def probe_operator(config: EraseConfig, operator: CurvatureOperator) -> CurvatureOperator:
    """The operator on a fixed, seeded subset of ``config.probe_examples`` curvature examples."""
    generator = torch.Generator().manual_seed(config.seed)
    count = min(config.probe_examples or DEFAULT_PROBE_EXAMPLES, operator.count)
    return operator.restrict(sorted(torch.randperm(operator.count, generator=generator)[:count].tolist()))


def _solve_with_cache(
    config: EraseConfig, operator: CurvatureOperator, b: Tensor, inverse: CachedInverse,
    callback: Callable[[int, float], None], calibration: StepCalibration | None = None,
) -> SolverResult:
    """Use a fitted curvature (K-FAC, EK-FAC or DataInf) directly or as the preconditioner of cg against
    the exact operator; the result names the method (``details["curvature_cache"]``).

    Direct: v = α (K + shift·I)⁻¹ b. α is the cache's ``calibration`` when it holds for this operator's
    shift and curvature kind (no exact product; with ``probe_examples`` > 0 the residual of that step is
    measured on the probe examples), else fitted on the probe examples (one exact product), with the
    reason in ``details["step_length_fallback"]``."""
    method = cache_method(inverse.layers)
    if config.curvature_use == "precondition":
        if config.solver not in ("cg", "sgd"):
            raise ConfigError("solver", "must be cg or sgd with `curvature_use=precondition`: a curvature cache "
                              f"preconditions the cg and sgd solvers only, got {config.solver!r}")
        result = solve(config.solver, operator, b, **_solver_options(config, operator, callback), preconditioner=inverse)
        result.details["curvature_cache"] = f"{method} preconditioner"
        return result
    if config.curvature_use != "direct":
        raise ConfigError("curvature_use",
                          f"unknown curvature_use {config.curvature_use!r} (expected 'precondition' or 'direct')")
    start = time.perf_counter()
    direction = inverse(b)
    details: dict[str, Any] = {"curvature_cache": f"{method} direct"}
    fallback: str | None
    if calibration is None:
        fallback = "the curvature cache has no step-length calibration"
    else:
        fallback = calibration.mismatch(operator.shift, operator.kind)
    residuals: list[float] = []
    if fallback is not None:
        probe = probe_operator(config, operator)
        product = probe.matvec(direction)
        # the step length that minimises the quadratic model ½ vᵀ(H+λI)v − bᵀv along the cached direction
        # (as in K-FAC's own rescaling): corrects the approximation's scale, never worse than v = 0
        step = step_length(b, direction, product)
        residuals = [_relative_residual(step * product, b)]
        details.update(step_length=step, step_length_source=f"fitted on {probe.count} probe examples",
                       step_length_fallback=fallback, probe_examples=probe.count,
                       note="residual against the exact operator on the probe examples")
        status = f"solved with the {method} approximation (no iterations; step length fitted on the probe examples)"
    else:
        assert calibration is not None
        step = calibration.step_length
        details.update(step_length=step, step_length_source="calibrated at fit time",
                       step_length_calibration=calibration.to_json())
        if config.probe_examples:  # asked for: measure the calibrated step's residual on this b
            probe = probe_operator(config, operator)
            residuals = [_relative_residual(step * probe.matvec(direction), b)]
            details.update(probe_examples=probe.count,
                           note="residual of the calibrated step against the exact operator on the probe examples")
            measured = f"residual measured on {probe.count} probe examples"
        else:
            details.update(probe_examples=0, note="no exact product: the residual on this b is not measured "
                           "(step_length_calibration.residuals: the calibration's, at fit time)")
            measured = "residual not measured"
        status = f"solved with the {method} approximation (no iterations; step length calibrated at fit time; {measured})"
    return SolverResult(step * direction, method, 0, residuals, [0] * len(residuals), False, status,
                        time.perf_counter() - start, details)


def _preconditioner(
    config: EraseConfig, operator: CurvatureOperator, operator_with: Callable[[float], CurvatureOperator],
    curvature_cache: dict[str, CurvatureLayer] | None, first: SolverResult,
) -> Callable[[Tensor, float], Tensor]:
    """(g, λ) ↦ ≈ (H + (λ + λ_wd) I)⁻¹ g as the first solve computed it: the cache's α (K + (λ + λ_wd) I)⁻¹ g
    with the same α (``curvature_use="direct"``), else the same solver on the exact operator at damping λ at
    the model's current θ."""
    if curvature_cache is not None and config.curvature_use == "direct":
        step = float(first.details["step_length"])
        cache = curvature_cache
        return lambda g, damping: step * CachedInverse(cache, operator.params, damping + operator.weight_decay)(g)
    quiet = replace(config, auto_damping=False)
    return lambda g, damping: _solve_once(quiet, operator_with(damping), g, False, curvature_cache, None).solution


def _relative_residual(product: Tensor, b: Tensor) -> float:
    """‖product − b‖ / ‖b‖ (0 when b = 0)."""
    norm_b = float(b.norm())
    return float((product - b).norm()) / norm_b if norm_b > 0 else 0.0


def erase(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    requests: Sequence[Request],
    config: EraseConfig | None = None,
    progress: bool = False,
    curvature_cache: dict[str, CurvatureLayer] | None = None,
    calibration: StepCalibration | None = None,
    heldout: Sequence[Example] | None = None,
    **overrides: Any,
) -> ErasureResult:
    """Compute the influence update of θ (the PEFT model's trainable tensors) for ``requests``.

    ``train`` is the training set the adapter was trained on; ``curvature_cache``: a fitted curvature's layers
    (``CurvatureCache.layers``: K-FAC, EK-FAC, DataInf or any registered method, ``llmeraser.curvature``), used as
    ``config.curvature_use`` says; ``calibration``: its step length fitted at fit time
    (``llmeraser.curvature.load_calibration``), used by ``curvature_use="direct"`` when its damping + weight decay
    equal the erasure's (the report's ``solver.step_length_source`` says); ``overrides`` replace fields of ``config``
    (e.g. ``solver="cg", curvature="hessian", damping=1e-2``); ``progress`` shows a progress bar of
    the solver's iterations. ``heldout``: examples the adapter never saw, for ``config.trust_region``'s
    held-out check and never-seen level. The model's weights are left unchanged.
    """
    config = EraseConfig(**{**asdict(config or EraseConfig()), **overrides})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model.eval()
    params = AdapterParameters.of(model)
    theta = params.flat()
    if not torch.isfinite(theta).all():
        raise NumericalError("the input adapter's weights contain NaN or Inf", stage="adapter")
    pairs, old_items, new_items, curvature_items = prepare_erasure(tokenizer, train, requests, config)
    timings["prepare_s"] = time.perf_counter() - start

    parallel = is_distributed()
    removed = sum(p.new is None for p in pairs)
    if parallel:  # each rank differentiates and multiplies over its shard; sums are all-reduced
        old_items, new_items = shard(old_items), shard(new_items)
        curvature_items = TokenizedOnDemand(tokenizer, shard(curvature_items.examples), curvature_items.config)

    start = time.perf_counter()
    b = influence_rhs(
        model, params, old_items, new_items, len(train), tokenizer.pad_token_id,
        config.weight_decay, config.scaling, config.batch_size,
        removed=removed, distributed=parallel,
    )
    timings["gradients_s"] = time.perf_counter() - start
    if not torch.isfinite(b).all():
        _raise_on_nonfinite_losses(model, old_items, new_items, tokenizer.pad_token_id, config.batch_size)
        raise NumericalError("the right-hand side b contains NaN or Inf", stage="gradients")

    start = time.perf_counter()

    def operator_with(damping: float) -> CurvatureOperator:
        return CurvatureOperator(
            model, params, curvature_items, tokenizer.pad_token_id, config.curvature,
            damping, config.weight_decay, config.batch_size, distributed=parallel,
        )

    result, operator, damping, attempts = _solve_with_damping(config, operator_with, b, progress, curvature_cache,
                                                              calibration)
    timings["solve_s"] = time.perf_counter() - start
    update = result.solution
    trust_region = None
    if config.trust_region:
        if parallel:
            raise ConfigError("trust_region", "runs in one process (not under torchrun)")
        start = time.perf_counter()
        trust_region = trust_region_update(
            model, tokenizer, train, pairs, b, _preconditioner(config, operator, operator_with, curvature_cache, result),
            damping=damping, weight_decay=config.weight_decay, scaling=config.scaling, max_length=config.max_length,
            loss_scope=config.loss_scope,
            batch_size=config.batch_size, heldout=heldout, first_direction=update,
            settings=TrustRegionSettings(config.trust_region_steps, config.kept_examples, config.heldout_tolerance,
                                         config.kl_budget, damping_factor=config.trust_region_damping_factor,
                                         memory=config.trust_region_memory, kept_tolerance=config.kept_tolerance,
                                         refit_steps=config.trust_region_refit_steps,
                                         refit_kept_level=config.trust_region_refit_kept_level,
                                         follow_bounds=config.trust_region_follow_bounds, seed=config.seed),
            progress=(lambda line: tqdm.write(line)) if progress else None,
        )
        update = trust_region.update
        timings["trust_region_s"] = time.perf_counter() - start
    report = {
        "requests": count_by_kind([p.request for p in pairs]),
        "affected_examples": affected_examples(pairs),  # by the requests' ids (the lineage keeps the hashes)
        "duplicates_remaining": duplicates_report(train, pairs),  # removed examples whose copy stays
        "n_train": len(train),
        "n_curvature_examples": operator.count,
        "world_size": world_size(),
        "n_parameters": params.dim,
        "b_norm": float(b.norm()),
        "update_norm": float(update.norm()),
        "theta_norm": float(theta.norm()),
        "solver": result.summary(),
        "curvature_cache_method": cache_method(curvature_cache) if curvature_cache else None,
        "trust_region": trust_region.to_json() if trust_region else None,
        "damping_used": damping,
        "damping_attempts": attempts,
        "truncated_prompts": {  # prompts cut from the left to fit max_length (the recipe's policy)
            "edited_examples": sum(item.truncated for item in [*old_items, *new_items]),
            # None: not tokenised, because the solve never read the curvature examples
            "curvature_examples": sum(item.truncated for item in curvature_items) if curvature_items.tokenized else None,
        },
        "config": config.to_json(),
        "timings_s": {**timings, "total_s": sum(timings.values())},
        "peak_memory_mb": peak_memory_mb(),
        "versions": library_versions(),
    }
    return ErasureResult(theta, update, pairs, result, report, b)


def library_versions() -> dict[str, str]:
    """Versions of llmeraser and the libraries that shape its numbers."""
    import peft
    import transformers

    from llmeraser import __version__

    return {
        "llmeraser": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def save_erased_adapter(
    model: Any,
    result: ErasureResult,
    out_dir: str | Path,
    extra_files: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write θ_new as a new PEFT adapter directory, atomically, with ``erasure_report.json`` (which also
    records the SHA-256 of the written adapter) and any ``extra_files`` beside the weights (a dict, or a
    function of the temporary directory holding the written weights that returns one)."""

    def files(written: Path) -> dict[str, Any]:
        extra = extra_files(written) if callable(extra_files) else (extra_files or {})
        return erased_adapter_files(result.report, written, extra)

    return save_adapter(model, out_dir, result.theta_new, files)


def erased_adapter_files(report: dict[str, Any], written: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The files of an erased adapter beside its weights (in ``written``, the temporary directory), whatever
    the method: ``erasure_report.json`` (``report`` with the written adapter's hash), ``extra`` (training
    record, lineage) and the model card ``README.md`` (``llmeraser.model_card``; it replaces PEFT's)."""
    from llmeraser.lineage import LINEAGE_FILE
    from llmeraser.model_card import MODEL_CARD, base_model_of, erasure_model_card, lineage_head

    card = erasure_model_card(report, base_model_of(written), lineage_head(extra.get(LINEAGE_FILE)))
    return {"erasure_report.json": {**report, "output_adapter_sha256": adapter_hash(written)}, **extra, MODEL_CARD: card}
