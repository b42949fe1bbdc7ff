"""Dry-run estimates: the time and peak memory of each stage of ``train``, ``erase`` and ``fit-curvature``,
from a few timed probe steps, without training, solving, fitting or writing anything.

How the time is estimated:

- The stage's batches are built exactly as the real run builds them: the same tokenisation, the
  training schedule (``train.batch_schedule`` from the recipe's seed, or a paired retrain's), the request
  pairs (old versions, then new ones) and the curvature examples in order, and the stochastic solvers'
  mini-batches and probe subset drawn from their seed.
- The stage's own operation (a training step: collate + forward + backward + optimizer step; a gradient
  pass; a curvature product ``CurvatureOperator.matvec``) is timed on two *representative* batches of
  that list: the one with the most padded tokens (batch size × padded length: it also sets the memory
  peak) and the median one, after one discarded warm-up call on the largest. Each probe is repeated
  until it has run ``ProbeSettings.min_probe_s`` (at most ``max_repeats`` times) and averaged.
- The cost of a batch is modelled as ``fixed + per_token × tokens`` through those two points (a constant
  when the two have about the same size), and summed over every batch the stage will run:
  ``train`` = Σ over the schedule's steps; ``erase`` = the gradient batches of the request pairs, then
  the solver: ``cg`` max_iters full products (one per iteration, each a sum over the curvature
  batches; the residual bookkeeping is vector arithmetic, included as measured), ``lissa`` / ``sgd``
  the power iteration on the probe subset + max_iters mini-batch products + two probe-subset products
  (the last iterate and the average) every ``check_every`` steps, ``direct`` p products (in chunks) +
  the dense factorisation (timed on a smaller matrix, scaled as p³); with a K-FAC curvature cache,
  cg adds one K-FAC inverse per iteration, and ``curvature_use="direct"`` is one inverse + one product
  over the probe subset (no product when the cache's step length calibration holds and no
  ``probe_examples`` are asked for); the trust region (``config.trust_region``) adds, per step, one
  gradient over its kept sample and the replacements and ``plan.LINE_SEARCH_EVALUATIONS`` forward
  passes over those, the edited examples and the held-out ones.
- ``erase`` as the command runs it is an ``EraseRun`` (``Adapter.plan_erase``): its dry run
  (``Adapter.estimate_plan``) estimates that plan's stages — the paired retrain's schedule, or the
  curvature fit the plan does first followed by the update its config names — and the real run
  (``Adapter.run_plan``) executes the same object.
- ``fit-curvature`` (``estimate_fit_curvature``): K-FAC = one sampled forward + backward per batch of
  the fit examples (``curvature.kfac.kfac_sums``) + the eigendecompositions of the factors (timed once on the
  probe's factors: their sizes do not depend on the data); EK-FAC = that + the second sampled pass
  (``curvature.ekfac.ekfac_sums``); DataInf = the per-example gradients of every batch
  (``curvature.datainf.fit_datainf``); each method says how in its ``CurvatureMethod.estimate_fit`` (a
  method without one: its fit timed on each batch); the
  step-length calibration = the per-example gradients of the directions + one cached-curvature inverse
  and one exact Gauss-Newton product over the calibration examples per direction.
- The warm-up call's excess over the model (first-call initialisation) is added once per stage, as a
  real run pays it once: it dominates stages of a few calls.
- Iterative solvers may stop before max_iters (at ``tol``, or on a stall): the solve estimate is for
  running all of them, an upper bound.

Memory: the process's peak resident set size (RSS, ``eraser.peak_memory_mb``) after the stage's probes, which ran
the stage's largest batch with the real code. It is a *process* peak: monotone over the run, and it
includes the Python runtime, the libraries, the model and every earlier stage; it is the same measure
the erasure report records. For the direct solver the dense p × p matrices are added analytically, for
DataInf the n × p per-example gradients before their float32 copy.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.calibration import StepCalibration
from llmeraser.curvature.inverse import CachedInverse
from llmeraser.curvature.operators import CurvatureOperator
from llmeraser.curvature.registry import CurvatureLayer, cache_method
from llmeraser.data import (
    Example,
    TokenizationConfig,
    TokenizedExample,
    collate,
    example_losses,
    tokenize_examples,
)
from llmeraser.eraser import DEFAULT_PROBE_EXAMPLES, EraseConfig, peak_memory_mb, prepare_erasure
from llmeraser.errors import ConfigError
from llmeraser.gradients import summed_gradient
from llmeraser.plan import LINE_SEARCH_EVALUATIONS
from llmeraser.requests import Request
from llmeraser.solvers import CHECK_EVERY, DENSE_CHUNK_SIZE, DIRECT_MAX_DIM, POWER_ITERATIONS, SOLVERS, direct_too_large
from llmeraser.train import LBFGS_MAX_ITER, Schedule, TrainConfig, batch_schedule, l2_penalty

MIB = 2.0**20
SAMPLED_MINIBATCHES = 64  # stochastic solvers: mini-batches drawn exactly to average their cost over


@dataclass(frozen=True)
class ProbeSettings:
    """How long to time each probe batch: repeated until ``min_probe_s`` (at most ``max_repeats`` times)."""

    min_probe_s: float = 0.5
    max_repeats: int = 10


@dataclass
class StageEstimate:
    """One stage: estimated (or measured) seconds, the process peak RSS after its probes (MiB), and how."""

    name: str
    seconds: float
    peak_mib: float
    how: str

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.name, "seconds": self.seconds, "peak_mib": self.peak_mib, "how": self.how}


@dataclass
class RunEstimate:
    """The stages of one command, with the sizes that drive them and notes on what the numbers mean."""

    command: str
    stages: list[StageEstimate]
    sizes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: dict[str, CurvatureLayer] | None = field(default=None, repr=False)  # a fit's probe layers (not reported)

    @property
    def total_seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def peak_mib(self) -> float:
        return max((stage.peak_mib for stage in self.stages), default=0.0)

    def stage(self, name: str) -> StageEstimate:
        """The stage called ``name`` (KeyError if there is none)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "stages": [stage.to_json() for stage in self.stages],
            "total_seconds": self.total_seconds,
            "peak_mib": self.peak_mib,
            "sizes": self.sizes,
            "notes": self.notes,
        }

    def table(self) -> str:
        """A printable table: one row per stage, then the total, the sizes and the notes."""
        rows = [[s.name, f"{s.seconds:.2f}", f"{s.peak_mib:.0f}", s.how] for s in self.stages]
        rows.append(["total", f"{self.total_seconds:.2f}", f"{self.peak_mib:.0f}", ""])
        header = ["stage", "seconds", "peak MiB", "how"]
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(3)]

        def line(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]]
            return "  ".join(cells).rstrip()

        out = [f"llmeraser {self.command} --dry-run: an estimate from timed probe steps; nothing was written"]
        out += [line(header), line(["-" * w for w in widths] + ["---"])]
        out += [line(r) for r in rows[:-1]]
        out += [line(["-" * w for w in widths] + [""]), line(rows[-1])]
        if self.sizes:
            out.append("sizes: " + ", ".join(f"{key} {value}" for key, value in self.sizes.items()))
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)


def measured_stage(name: str, seconds: float, how: str = "measured") -> StageEstimate:
    """A stage that the dry run really ran (loading, checks), with the process peak so far."""
    return StageEstimate(name, seconds, peak_memory_mb(), how)


# ------------------------------------------------------------------------------------------- cost model


def batch_tokens(items: Sequence[TokenizedExample]) -> int:
    """Padded tokens of a batch: batch size × the longest example (``collate`` right-pads to it)."""
    return len(items) * max(len(item.input_ids) for item in items) if items else 0


@dataclass(frozen=True)
class BatchCost:
    """Seconds for one batch of ``tokens`` padded tokens: ``fixed_s + per_token_s × tokens``.

    ``first_call_s``: what the first call in the process took beyond that (lazy initialisation, first
    allocations); a real run pays it once per operation, which matters for stages of a few calls.
    """

    fixed_s: float
    per_token_s: float
    probes: int = 0
    first_call_s: float = 0.0

    def __call__(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens

    def total(self, token_counts: Sequence[int]) -> float:
        """Seconds for these batches in steady state (``first_call_s`` not included)."""
        return sum(self(tokens) for tokens in token_counts)


def timed(operation: Callable[[], Any], settings: ProbeSettings) -> tuple[float, int]:
    """Mean seconds of ``operation()``, repeated until ``settings.min_probe_s`` or ``max_repeats``; and the count."""
    total, count = 0.0, 0
    while count < max(1, settings.max_repeats) and (count == 0 or total < settings.min_probe_s):
        start = time.perf_counter()
        operation()
        total += time.perf_counter() - start
        count += 1
    return total / count, count


def warm_timed(operation: Callable[[], Any], settings: ProbeSettings) -> tuple[Any, float, float]:
    """(the result of a first, warm-up call of ``operation()``, the mean seconds of later calls (``timed``),
    the first call's excess over that mean)."""
    start = time.perf_counter()
    result = operation()
    first = time.perf_counter() - start
    seconds, _ = timed(operation, settings)
    return result, seconds, max(0.0, first - seconds)


def representative_batches(batches: Sequence[Sequence[TokenizedExample]]) -> list[Sequence[TokenizedExample]]:
    """The batch with the most padded tokens and the median one (one batch if they coincide)."""
    ranked = sorted(batches, key=batch_tokens)
    largest, median = ranked[-1], ranked[(len(ranked) - 1) // 2]
    return [largest] if median is largest else [largest, median]


def fit_batch_cost(
    operation: Callable[[Sequence[TokenizedExample]], Any],
    batches: Sequence[Sequence[TokenizedExample]],
    settings: ProbeSettings,
) -> BatchCost:
    """Time ``operation(batch)`` on the representative batches (after a discarded warm-up on the largest)
    and fit the per-batch cost through them."""
    probes = representative_batches(batches)
    start = time.perf_counter()
    operation(probes[0])  # warm-up: first-call allocations, lazy initialisation; also the memory peak
    first = time.perf_counter() - start
    points = []
    calls = 1
    for batch in probes:
        seconds, count = timed(functools.partial(operation, batch), settings)
        points.append((batch_tokens(batch), seconds))
        calls += count
    cost = _fit(points, calls)
    return replace(cost, first_call_s=max(0.0, first - cost(points[0][0])))


def _fit(points: list[tuple[int, float]], calls: int) -> BatchCost:
    """The cost line through (tokens, seconds) of the largest and the median probe batch."""
    (t1, s1) = points[0]
    if len(points) == 1 or t1 < 1.2 * points[1][0]:  # about the same size: a constant per token
        mean_tokens = sum(t for t, _ in points) / len(points)
        mean_seconds = sum(s for _, s in points) / len(points)
        return BatchCost(0.0, mean_seconds / max(mean_tokens, 1), calls)
    t2, s2 = points[1]
    slope = (s1 - s2) / (t1 - t2)
    if slope <= 0:  # timing noise: no measurable per-token cost; the mean as a constant
        return BatchCost(0.5 * (s1 + s2), 0.0, calls)
    fixed = s2 - slope * t2
    if fixed < 0:  # cost grows faster than linearly: proportional through the larger point
        return BatchCost(0.0, s1 / t1, calls)
    return BatchCost(fixed, slope, calls)


def chunks(items: Sequence[TokenizedExample], size: int) -> list[Sequence[TokenizedExample]]:
    """Consecutive batches of at most ``size`` items, as ``iter_batches`` makes them."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def _sizes(model: Any, params: AdapterParameters) -> dict[str, Any]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    adapter = sum(t.numel() * t.element_size() for t in params.tensors)
    return {
        "model weights": f"{weights / MIB:.1f} MiB",
        "adapter": f"{params.dim:,} trainable parameters ({adapter / MIB:.2f} MiB)",
    }


def _save_seconds(params: AdapterParameters) -> float:
    """Serialise θ in memory (safetensors) and hash it: the work of writing the adapter, without writing."""
    from safetensors.torch import save

    start = time.perf_counter()
    data = save({name: tensor.detach().contiguous() for name, tensor in zip(params.names, params.tensors)})
    hashlib.sha256(data).hexdigest()
    hashlib.sha256(data).hexdigest()  # the output hash reads the written weights back
    return time.perf_counter() - start


def _save_cache_seconds(layers: dict[str, Any], examples: Sequence[Example]) -> float:
    """The data hash of the cache's metadata and the cache's tensors serialised in memory (safetensors):
    the work of ``save_cache``, without writing."""
    from safetensors.torch import save

    from llmeraser.curvature.cache import cache_tensors
    from llmeraser.hashing import dataset_hash

    start = time.perf_counter()
    dataset_hash(examples)
    save(cache_tensors(layers))
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ train


def estimate_train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    settings: ProbeSettings | None = None,
    schedule: Schedule | None = None,
) -> RunEstimate:
    """Estimate ``train_adapter(model, tokenizer, examples, config, schedule=schedule)`` from a few real
    training steps, summed over every batch the run will take.

    θ and the model's mode are restored afterwards (the probe steps use an Adam with step size 0).
    """
    settings = settings or ProbeSettings()
    params = AdapterParameters.of(model)
    stages = []
    start = time.perf_counter()
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(config.max_length, loss_scope=config.loss_scope))
    stages.append(measured_stage("tokenize", time.perf_counter() - start))
    pad = tokenizer.pad_token_id
    theta, was_training = params.flat(), model.training
    model.eval()
    optimizer = torch.optim.Adam(params.tensors, lr=0.0)  # the real step's work, θ unchanged

    def step(batch_items: Sequence[TokenizedExample]) -> None:
        batch = collate(batch_items, pad)
        objective = example_losses(model, batch).mean() + l2_penalty(params, config.weight_decay)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        float(objective.detach())

    def forward_backward(batch_items: Sequence[TokenizedExample]) -> None:
        batch = collate(batch_items, pad)
        (example_losses(model, batch).sum() / len(items)).backward()
        optimizer.zero_grad(set_to_none=True)

    try:
        if config.optimizer == "lbfgs":
            batches = chunks(items, config.batch_size)
            cost = fit_batch_cost(forward_backward, batches, settings)
            evaluations = config.epochs * (LBFGS_MAX_ITER + 1)
            seconds = evaluations * cost.total([batch_tokens(b) for b in batches]) + cost.first_call_s
            how = (f"L-BFGS: up to {evaluations} full passes of {len(batches)} batches (upper bound; line-search "
                   f"evaluations can add more), {cost.probes} probe passes")
        else:  # the real run's batches: its schedule (a paired retrain's), else the one the recipe's seed draws
            steps = batch_schedule(len(items), config) if schedule is None else schedule
            batches = [[items[i] for i in batch] for batch in steps if batch]
            cost = fit_batch_cost(step, batches, settings)
            seconds = cost.total([batch_tokens(b) for b in batches]) + cost.first_call_s
            how = (f"{config.epochs} epochs, {len(batches)} steps of ≤ {config.batch_size} examples"
                   f"{' (paired schedule)' if schedule is not None else ''}; {cost.probes} probe steps")
        stages.append(StageEstimate("train", seconds, peak_memory_mb(), how))
    finally:
        params.assign(theta)
        for tensor in params.tensors:
            tensor.grad = None
        model.train(was_training)
    stages.append(StageEstimate("save", _save_seconds(params), peak_memory_mb(), "in-memory serialisation + hash"))
    return RunEstimate("train", stages, _sizes(model, params), _notes())


def _notes() -> list[str]:
    return [
        "time: probe steps on the longest and the median batch of this run, extrapolated over all of its "
        "batches by a fixed + per-token cost",
        "peak MiB: the process's peak resident memory (RSS) after each stage's probes (a process peak, "
        "cumulative; includes the runtime, the libraries and the model)",
    ]


# ------------------------------------------------------------------------------------------------ erase


def estimate_erase(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    requests: Sequence[Request],
    config: EraseConfig | None = None,
    settings: ProbeSettings | None = None,
    curvature_cache: dict[str, CurvatureLayer] | None = None,
    calibration: StepCalibration | None = None,
    heldout: Sequence[Example] | None = None,
) -> RunEstimate:
    """Estimate ``erase(model, tokenizer, train, requests, config, curvature_cache=curvature_cache,
    calibration=calibration, heldout=heldout)``
    (single process) from a few timed gradient passes and curvature products; the model's weights are
    untouched."""
    config = config or EraseConfig()
    settings = settings or ProbeSettings()
    model.eval()
    params = AdapterParameters.of(model)
    pad = tokenizer.pad_token_id
    stages = []

    start = time.perf_counter()  # the same preparation as ``erase``
    pairs, old_items, new_items, curvature_items = prepare_erasure(tokenizer, train, requests, config)
    stages.append(measured_stage("prepare", time.perf_counter() - start))

    edited = [*old_items, *new_items]
    gradient_batches = chunks(edited, config.batch_size)
    cost = fit_batch_cost(
        lambda batch: summed_gradient(model, params, batch, pad, len(batch)), gradient_batches, settings
    )
    stages.append(StageEstimate(
        "gradients", cost.total([batch_tokens(b) for b in gradient_batches]) + cost.first_call_s, peak_memory_mb(),
        f"{len(gradient_batches)} batches ({len(old_items)} old + {len(new_items)} new versions); "
        f"{cost.probes} probe passes",
    ))

    seconds, how, extra_mib = _estimate_solve(model, params, curvature_items, pad, config, settings, curvature_cache,
                                              calibration)
    direct = curvature_cache is not None and config.curvature_use == "direct"
    solver = cache_method(curvature_cache) if curvature_cache is not None and direct else config.solver
    stages.append(StageEstimate(f"solve ({solver})", seconds, peak_memory_mb() + extra_mib, how))
    if config.trust_region:
        stages.append(_estimate_trust_region(model, tokenizer, params, train, pairs, config, settings, heldout))
    stages.append(StageEstimate("save", _save_seconds(params), peak_memory_mb() + extra_mib,
                                "in-memory serialisation + hash"))
    notes = _notes()
    if solver in ("cg", "lissa", "sgd"):
        notes.append(f"solve: all {config.max_iters} iterations (it stops earlier when the residual reaches "
                     f"`tol={config.tol:g}`): an upper bound")
    if config.trust_region:
        steps = config.trust_region_steps + config.trust_region_refit_steps
        notes.append(f"trust region: all {steps} steps with {LINE_SEARCH_EVALUATIONS:g} line-search "
                     "evaluations each (it stops earlier when a check ends it): an estimate, not a bound")
    if config.auto_damping:
        notes.append(f"`auto_damping`: a failed solve is retried, up to {config.max_damping_attempts} solves in all")
    sizes = {**_sizes(model, params), "curvature examples": len(curvature_items), "edited examples": len(pairs)}
    return RunEstimate("erase", stages, sizes, notes)


def _estimate_trust_region(
    model: Any,
    tokenizer: Any,
    params: AdapterParameters,
    train: Sequence[Example],
    pairs: Sequence[Any],
    config: EraseConfig,
    settings: ProbeSettings,
    heldout: Sequence[Example] | None,
) -> StageEstimate:
    """The trust region's steps (``llmeraser.trust_region``): one gradient over the kept sample and the
    replacements, and ``LINE_SEARCH_EVALUATIONS`` forward passes over the kept sample, the edited examples'
    versions and the held-out examples, per step, plus one of each at θ̂."""
    from llmeraser.trust_region import kept_sample

    tokenization = TokenizationConfig(max_length=config.max_length, loss_scope=config.loss_scope)
    kept = kept_sample(train, pairs, config.kept_examples, config.seed)
    new_versions = [p.new for p in pairs if p.new is not None]
    removed = [p.old for p in pairs if p.new is None]
    pad = tokenizer.pad_token_id
    gradient_items = tokenize_examples(tokenizer, [*kept, *new_versions], tokenization)
    forward_items = tokenize_examples(tokenizer, [*kept, *new_versions, *removed, *(heldout or ())], tokenization)
    gradient_batches = chunks(gradient_items, config.batch_size)
    forward_batches = chunks(forward_items, config.batch_size)
    gradient_cost = fit_batch_cost(lambda batch: summed_gradient(model, params, batch, pad, len(batch)),
                                   gradient_batches, settings)

    def forward(batch: Sequence[TokenizedExample]) -> None:
        with torch.no_grad():
            example_losses(model, collate(list(batch), pad))

    forward_cost = fit_batch_cost(forward, forward_batches, settings)
    gradient_s = gradient_cost.total([batch_tokens(b) for b in gradient_batches])
    forward_s = forward_cost.total([batch_tokens(b) for b in forward_batches])
    steps = config.trust_region_steps + config.trust_region_refit_steps
    seconds = ((steps + 1) * gradient_s + (1 + steps * LINE_SEARCH_EVALUATIONS) * forward_s
               + gradient_cost.first_call_s + forward_cost.first_call_s)
    refit = f" (+ {config.trust_region_refit_steps} refit)" if config.trust_region_refit_steps else ""
    how = (f"{config.trust_region_steps}{refit} steps × (1 gradient over {len(gradient_items)} kept + replacement examples + "
           f"{LINE_SEARCH_EVALUATIONS:g} forward passes over {len(forward_items)} examples), + θ̂'s; "
           f"{gradient_cost.probes + forward_cost.probes} probe passes")
    return StageEstimate("trust region", seconds, peak_memory_mb(), how)


def _estimate_solve(
    model: Any,
    params: AdapterParameters,
    curvature_items: Sequence[TokenizedExample],
    pad: int,
    config: EraseConfig,
    settings: ProbeSettings,
    curvature_cache: dict[str, CurvatureLayer] | None = None,
    calibration: StepCalibration | None = None,
) -> tuple[float, str, float]:
    """(seconds, how, extra MiB beyond the probes' process peak) of the solve stage."""
    dtype = params.tensors[0].dtype
    vector = 1e-3 * torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)

    def operator_on(batch: Sequence[TokenizedExample]) -> CurvatureOperator:
        return CurvatureOperator(model, params, list(batch), pad, config.curvature,
                                 config.damping, config.weight_decay, max(len(batch), 1))

    def product(batch: Sequence[TokenizedExample]) -> None:
        operator_on(batch).matvec(vector)

    batches = chunks(curvature_items, config.batch_size)
    options = config.solver_options
    count = len(curvature_items)
    generator = torch.Generator().manual_seed(config.seed)  # the probe subset of ``eraser._solver_options``
    n_probe = min(config.probe_examples or DEFAULT_PROBE_EXAMPLES, count)
    probe_indices = sorted(torch.randperm(count, generator=generator)[:n_probe].tolist())
    probe_batches = chunks([curvature_items[i] for i in probe_indices], config.batch_size)
    preconditioned_sgd = (curvature_cache is not None and config.curvature_use == "precondition"
                          and config.solver == "sgd")
    if curvature_cache is not None and not preconditioned_sgd:
        return _estimate_cached(params, batches, probe_batches, config, settings, curvature_cache, product, vector,
                                calibration)
    if config.solver == "cg":
        cost = fit_batch_cost(product, batches, settings)
        full = cost.total([batch_tokens(b) for b in batches])
        vector_ops = _vector_ops_seconds(params.dim, dtype)
        seconds = config.max_iters * (full + vector_ops) + cost.first_call_s
        how = (f"{config.max_iters} iterations × 1 product over {len(batches)} batches ({config.curvature}); "
               f"{cost.probes} probe products")
        return seconds, how, 0.0
    if config.solver == "direct":
        return _estimate_direct(model, params, batches, pad, config, settings, product, vector)
    if config.solver not in ("lissa", "sgd"):
        raise ConfigError("solver", f"unknown solver {config.solver!r} (expected one of: {', '.join(SOLVERS)})")

    if count <= config.batch_size:
        sampled = batches
    else:  # the mini-batches of ``CurvatureOperator.sample`` with the solver's seed
        generator = torch.Generator().manual_seed(int(options.get("seed", config.seed)))
        sampled = [
            [curvature_items[i] for i in sorted(torch.randperm(count, generator=generator)[: config.batch_size].tolist())]
            for _ in range(min(config.max_iters, SAMPLED_MINIBATCHES))
        ]
    cost = fit_batch_cost(product, [*sampled, *probe_batches], settings)
    step_s = sum(cost(batch_tokens(b)) for b in sampled) / len(sampled)
    probe_s = cost.total([batch_tokens(b) for b in probe_batches])
    check_every = int(options.get("check_every", CHECK_EVERY))
    checks = config.max_iters // check_every + (1 if config.max_iters % check_every else 0)
    power = 0 if (config.solver == "lissa" and options.get("scale") is not None) else \
        POWER_ITERATIONS
    seconds = config.max_iters * step_s + (2 * checks + power) * probe_s + cost.first_call_s
    how = (f"{config.max_iters} mini-batch products + {checks} checks × 2 and {power} power-iteration products "
           f"on the {len(probe_indices)}-example probe subset ({config.curvature}); {cost.probes} probe products")
    if preconditioned_sgd and curvature_cache is not None:  # one cache inverse per step and per power iteration
        inverse = CachedInverse(curvature_cache, params, config.weight_decay + config.damping)
        _, inverse_s, inverse_first_s = warm_timed(lambda: inverse(vector), settings)
        seconds += (config.max_iters + power) * inverse_s + inverse_first_s
        how += f"; {config.max_iters + power} curvature-cache inverses (preconditioner)"
    return seconds, how, 0.0


def _estimate_cached(
    params: AdapterParameters,
    batches: list[Sequence[TokenizedExample]],
    probe_batches: list[Sequence[TokenizedExample]],
    config: EraseConfig,
    settings: ProbeSettings,
    curvature_cache: dict[str, CurvatureLayer],
    product: Callable[[Sequence[TokenizedExample]], None],
    vector: torch.Tensor,
    calibration: StepCalibration | None = None,
) -> tuple[float, str, float]:
    """A K-FAC curvature cache: ``precondition`` runs cg with one K-FAC inverse per iteration besides the
    product; ``direct`` applies the inverse once and fits the step length with one probe-subset product
    (none with a matching ``calibration`` unless ``probe_examples`` asks to measure the residual)."""
    inverse = CachedInverse(curvature_cache, params, config.weight_decay + config.damping)
    _, inverse_s, first_call_s = warm_timed(lambda: inverse(vector), settings)
    shift = config.weight_decay + config.damping
    calibrated = calibration is not None and calibration.mismatch(shift, config.curvature) is None
    if config.curvature_use == "direct" and calibrated and not config.probe_examples:
        return inverse_s + first_call_s, "1 K-FAC inverse; step length calibrated at fit time (no product)", 0.0
    if config.curvature_use == "direct":
        cost = fit_batch_cost(product, probe_batches, settings)
        seconds = inverse_s + cost.total([batch_tokens(b) for b in probe_batches]) + cost.first_call_s + first_call_s
        return seconds, (f"1 K-FAC inverse + 1 product over the {len(probe_batches)} probe-subset batches; "
                         f"{cost.probes} probe products"), 0.0
    if config.solver != "cg":
        raise ConfigError("solver", "must be cg or sgd with `curvature_use=precondition`: a curvature cache "
                          f"preconditions the cg and sgd solvers only, got {config.solver!r}")
    cost = fit_batch_cost(product, batches, settings)
    full = cost.total([batch_tokens(b) for b in batches])
    seconds = config.max_iters * (full + inverse_s + _vector_ops_seconds(params.dim, vector.dtype))
    seconds += cost.first_call_s + first_call_s
    how = (f"{config.max_iters} iterations × (1 product over {len(batches)} batches + 1 K-FAC inverse); "
           f"{cost.probes} probe products")
    return seconds, how, 0.0


def _vector_ops_seconds(dim: int, dtype: torch.dtype) -> float:
    """A cg iteration's vector arithmetic besides the product (a few axpys and dot products), timed."""
    x, p, r = (torch.ones(dim, dtype=dtype) for _ in range(3))
    start = time.perf_counter()
    for _ in range(5):
        float(p @ r)
        x = x + 0.5 * p
        r = r - 0.5 * p
        float(r.norm())
        float(r @ r)
        p = r + 0.5 * p
    return (time.perf_counter() - start) / 5


def _estimate_direct(
    model: Any,
    params: AdapterParameters,
    batches: list[Sequence[TokenizedExample]],
    pad: int,
    config: EraseConfig,
    settings: ProbeSettings,
    product: Callable[[Sequence[TokenizedExample]], None],
    vector: torch.Tensor,
) -> tuple[float, str, float]:
    """The direct solver: ⌈p / chunk⌉ chunked products over all batches, one residual product, and the
    float64 eigendecomposition + Cholesky of the p × p matrix (timed at a smaller size, scaled as p³)."""
    options = config.solver_options
    dim = params.dim
    max_dim = int(options.get("max_dim", DIRECT_MAX_DIM))
    if dim > max_dim:
        raise direct_too_large(dim, max_dim)
    chunk = min(int(options.get("chunk_size", DENSE_CHUNK_SIZE)), dim)
    tokens = [batch_tokens(b) for b in batches]
    single = fit_batch_cost(product, batches, settings)
    if config.curvature == "hessian":  # one batched double-backward per chunk of basis vectors
        basis = vector.new_zeros(chunk, dim)
        basis[torch.arange(chunk), torch.arange(chunk)] = 1.0

        def chunk_product(batch: Sequence[TokenizedExample]) -> None:
            CurvatureOperator(model, params, list(batch), pad, "hessian", config.damping, config.weight_decay,
                              max(len(batch), 1)).matmat(basis)

        chunk_cost = fit_batch_cost(chunk_product, batches, settings)
        products = math.ceil(dim / chunk) * chunk_cost.total(tokens) + chunk_cost.first_call_s
        probes = single.probes + chunk_cost.probes
    else:  # gauss-newton: one product per basis vector
        products = dim * single.total(tokens)
        probes = single.probes
    size = min(dim, 256)
    matrix = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = matrix @ matrix.T + size * torch.eye(size, dtype=torch.float64)
    start = time.perf_counter()
    torch.linalg.eigvalsh(matrix)
    torch.linalg.cholesky_ex(matrix)
    factor_s = (time.perf_counter() - start) * (dim / size) ** 3
    seconds = products + single.total(tokens) + single.first_call_s + factor_s
    extra_mib = 4 * dim * dim * 8 / MIB  # the matrix, its symmetrised copy, the factor, eigvalsh workspace
    how = (f"{dim} basis products in chunks of {chunk} over {len(batches)} batches ({config.curvature}) + "
           f"factorisation; {probes} probe products")
    return seconds, how, extra_mib


# ---------------------------------------------------------------------------------------- fit-curvature


def estimate_fit_curvature(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    method: str = "kfac",
    *,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int = 256,
    loss_scope: str = "response",
    curvature_examples: int | None = None,
    damping: float | None = None,
    calibration_examples: int = 16,
    calibration_directions: int = 8,
    calibration_damping: float = 1e-2,
    weight_decay: float = 0.0,
    settings: ProbeSettings | None = None,
) -> RunEstimate:
    """Estimate ``fit-curvature`` (the method's ``fit``, ``calibrate_step_length`` when ``calibration_examples``
    > 0, ``save_cache``) from a few timed probe passes on its own batches; θ is untouched. The estimate's
    ``layers`` are the probe's fitted layers (an erase after the fit is estimated with them).

    The fit examples (``curvature_subset``) and the calibration's draws (``calibration_draws``) are those
    of the real run; the fit is estimated as its method says (``CurvatureMethod.estimate_fit``; the module
    docstring says what is timed per method)."""
    from llmeraser.curvature.cache import curvature_subset
    from llmeraser.curvature.calibration import calibration_draws, calibration_pool
    from llmeraser.curvature.registry import FitProbe, curvature_methods, default_fit_estimate, get_curvature_method
    from llmeraser.gradients import per_example_gradients

    if method not in curvature_methods():
        raise ConfigError("method", f"unknown curvature method {method!r} (expected one of: {', '.join(curvature_methods())})")
    curvature_method = get_curvature_method(method)
    settings = settings or ProbeSettings()
    model.eval()
    params = AdapterParameters.of(model)
    pad = tokenizer.pad_token_id
    stages = []

    start = time.perf_counter()  # the same tokenisation as ``fit-curvature``
    chosen = curvature_subset(examples, curvature_examples, seed)
    tokenization = TokenizationConfig(max_length=max_length, loss_scope=loss_scope)
    items = tokenize_examples(tokenizer, chosen, tokenization)
    every = calibration_pool(tokenizer, examples, items, calibration_examples, tokenization)
    stages.append(measured_stage("tokenize", time.perf_counter() - start))

    n = len(items)
    batches = chunks(items, batch_size)

    def time_batches(run: Callable[[Sequence[TokenizedExample]], Any],
                     timed: list[Sequence[TokenizedExample]]) -> tuple[float, int]:
        cost = fit_batch_cost(run, timed, settings)
        return cost.total([batch_tokens(b) for b in timed]) + cost.first_call_s, cost.probes

    def time_once(run: Callable[[], Any]) -> tuple[Any, float]:
        result, seconds, first_call_s = warm_timed(run, settings)
        return result, seconds + first_call_s

    probe = FitProbe(model, params, items, batches, pad, seed, damping, time_batches, time_once)
    fitted = (curvature_method.estimate_fit(probe) if curvature_method.estimate_fit is not None
              else default_fit_estimate(curvature_method, probe))
    layers, extra_mib = fitted.layers, fitted.extra_mib
    stages.append(StageEstimate(f"fit ({method})", fitted.seconds, peak_memory_mb() + extra_mib, fitted.how))

    calibration_note = []
    if calibration_examples > 0:
        curvature_items, direction_items = calibration_draws(every, calibration_examples, calibration_directions, seed)
        directions = len(direction_items)
        gradient_batches = chunks(direction_items, batch_size)
        gradient_cost = fit_batch_cost(
            lambda batch: per_example_gradients(model, params, batch, pad, len(batch)), gradient_batches, settings
        )
        dtype = params.tensors[0].dtype
        vector = 1e-3 * torch.randn(params.dim, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64).to(dtype)
        inverse = CachedInverse(layers, params, calibration_damping + weight_decay)
        _, inverse_s, inverse_first = warm_timed(lambda: inverse(vector), settings)
        product_batches = chunks(curvature_items, batch_size)
        product_cost = fit_batch_cost(
            lambda batch: CurvatureOperator(model, params, list(batch), pad, "gauss-newton", calibration_damping,
                                            weight_decay, max(len(batch), 1)).matvec(vector),
            product_batches, settings,
        )
        seconds = (gradient_cost.total([batch_tokens(b) for b in gradient_batches]) + gradient_cost.first_call_s
                   + directions * inverse_s + inverse_first
                   + directions * product_cost.total([batch_tokens(b) for b in product_batches])
                   + product_cost.first_call_s)
        how = (f"per-example gradients of {directions} directions + {directions} inverses and {directions} exact "
               f"Gauss-Newton products over {len(curvature_items)} examples ({len(product_batches)} batches); "
               f"{gradient_cost.probes + product_cost.probes} probe passes")
        stages.append(StageEstimate("calibrate", seconds, peak_memory_mb() + extra_mib, how))
    else:
        calibration_note = ["`calibration_examples=0`: no step-length calibration"]

    stages.append(StageEstimate("save", _save_cache_seconds(layers, examples), peak_memory_mb() + extra_mib,
                                "data hash + in-memory serialisation of the cache"))
    sizes = {**_sizes(model, params), "fit examples": n}
    if calibration_examples > 0:
        sizes["calibration"] = f"{directions} directions × {len(curvature_items)} examples"
    notes = _notes() + calibration_note
    return RunEstimate("fit-curvature", stages, sizes, notes, layers)

