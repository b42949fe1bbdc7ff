"""The paper's protocol (benchmarks/README.md, "`llmeraser bench`") on TALLRec data: corrupt, train, undo by each method, measure.

For each ratio: a TALLRec set is drawn once (``data_seed``): ``n_train`` training examples, ``n_test``
test examples, and ``n_nonmembers`` further training-distribution examples that no model trains on (the
non-members of the membership-inference attack). The task's generator corrupts the training set and writes
the requests that undo the damage. Then, for each training seed (LoRA initialisation and example order):

- ``original``: the adapter trained on the training set as given (the corrupted one for query/response);
- ``retrain``: trained from the same initial θ, recipe and seed on the edited set (the gold standard);
- ``llmeraser``: the influence update of ``original`` (``eraser.erase``: cg on the exact damped
  Gauss–Newton operator of a curvature sample);
- ``llmeraser_cached``: the same update from a curvature fitted once per adapter (``cache_method``, on the
  whole training set, step length calibrated against the exact operator; ``fit-curvature``), then
  ``erase --curvature-use direct``; its time is the erase alone, the fit is reported beside it;
- ``gradient_ascent`` (removal), ``finetune`` (continued fine-tuning on the corrected examples), ``sisa``
  (K shard adapters; only affected shards retrained): see ``bench.baselines``.

Every method is scored on the same sets (``bench.metrics``), and attacked the same way (``bench.robustness``:
the merged adapter rounded to ``quantise_bits``, and ``relearn_steps`` of fine-tuning on ``relearn_examples``
kept examples of the forgotten examples' users or people), the retrained model included; the spread between
the retrained models of two different seeds is the yardstick for "as close to retraining as retraining is to
itself".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from torch import Tensor

from llmeraser.adapter import AdapterParameters, LoraSettings, attach_lora
from llmeraser.curvature.cache import fit_cached_curvature
from llmeraser.curvature.registry import curvature_methods
from llmeraser.data import Example, TokenizationConfig, tokenize_examples
from llmeraser.eraser import EraseConfig, erase
from llmeraser.models import load_base_model
from llmeraser.options import option, validate
from llmeraser.requests import resolve
from llmeraser.train import TrainConfig, paired_schedule, train_adapter
from llmeraser.trust_region import TrustRegionSettings
from llmeraser_bench.baselines import continued_finetuning, gradient_ascent, train_sisa, unlearn_sisa
from llmeraser_bench.metrics import EvalSets, SetPredictions, predict_sets, score_method
from llmeraser_bench.nextitem import score_next_item
from llmeraser_bench.pii import pii_task, score_pii
from llmeraser_bench.recsys.corruption import make_task
from llmeraser_bench.recsys.nextitem import NextItemMode, next_item_query_task, sample_next_item
from llmeraser_bench.recsys.ratings import RatingFormat
from llmeraser_bench.recsys.tallrec import sample_tallrec
from llmeraser_bench.resources import machine, measured
from llmeraser_bench.robustness import attack_metrics, relearn_set

# The SmolLM2 recipe and erase settings shared by the demo and ``llmeraser bench``.
SMOLLM2_LORA = LoraSettings(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
TINY_LORA = LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "lm_head"))
SMOLLM2_RECIPE = TrainConfig(epochs=2, lr=1e-3, batch_size=8, weight_decay=1e-2, max_length=256, lr_schedule="linear")


def smollm2_erase_config(**overrides: Any) -> EraseConfig:
    """Damped Gauss–Newton + cg, 5 iterations, curvature on 16 examples: fits a 10-minute CPU budget."""
    settings: dict[str, Any] = dict(solver="cg", curvature="gauss-newton", damping=1e-2, weight_decay=1e-2,
                                    max_iters=5, tol=1e-3, curvature_examples=16, batch_size=8)
    return EraseConfig(**{**settings, **overrides})


METHODS = ("original", "retrain", "llmeraser", "llmeraser_cached", "llmeraser_tr", "gradient_ascent", "finetune", "sisa")
# The cold update (``llmeraser``: cg on a 16-example curvature sample) is harmful and slower than retraining
# in every committed run; it is run only when asked for.
DEFAULT_METHODS = {
    "removal": ("original", "retrain", "llmeraser_cached", "llmeraser_tr", "gradient_ascent", "sisa"),
    "query": ("original", "retrain", "llmeraser_cached", "llmeraser_tr", "finetune", "sisa"),
    "response": ("original", "retrain", "llmeraser_cached", "llmeraser_tr", "finetune", "sisa"),
    "pii": ("original", "retrain", "llmeraser_cached", "llmeraser_tr", "gradient_ascent"),
    # next-item: no SISA by default (its four shard adapters are decoded as one ensemble, ~4x a method's decoding)
    "next-item": ("original", "retrain", "llmeraser_cached", "llmeraser_tr", "finetune"),
}
REMOVAL_RATIOS = (0.02, 0.05, 0.1)  # the removal task's default: each seed's original is trained once for all three
BenchTask = Literal["removal", "query", "response", "pii", "next-item"]  # recsys.corruption.TASKS and the generative ones
BENCH_TASKS: tuple[BenchTask, ...] = get_args(BenchTask)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``data``: ``ml-100k`` (the copy in the ``recbole`` package) or a rating-data
    directory (``format`` as in ``recsys.ratings.load_ratings``; detected when None). Sizes are examples;
    the defaults keep one task (two seeds) within 30 minutes on 2 CPU cores with SmolLM2-135M. For the
    ``pii`` task ``n_train`` and ``n_nonmembers`` count people (three examples each), ``ratio`` the share
    of people removed (as many others get one attribute corrected), and ``data`` is not used.
    ``quantise_bits`` (the quantisation check's bit widths; empty: not run), ``relearn_steps`` (0: no
    relearning attack) and ``relearn_examples`` set the attacks of ``bench.robustness``. The ``next-item`` task
    (``recsys.nextitem``; see ``next_item_config``) shows ``history_length`` items and ``n_candidates``
    candidates per prompt; its requests are query modifications of ``query_mode`` (``replace``: noisy history
    items restored; ``delete``: history items deleted). ``task_config`` gives each task's configuration."""

    task: BenchTask = option(
        "removal", help="removal / query (noisy prompts restored) / response (flipped labels corrected) on TALLRec "
        "data; pii: the generated people-attributes question-answer scenario; next-item: choose the next item among "
        "candidates, requests edit the rated history (`query_mode`)")
    data: str = option("ml-100k", help="ml-100k (the copy in the recbole package) or a rating-data directory")
    format: RatingFormat | None = option(None, help="format of `data` (default: detected from the files)")
    ratios: tuple[float, ...] = option((0.05,), gt=0.0, help="fraction(s) of training examples edited (removal: "
                                       f"{' '.join(map(str, REMOVAL_RATIOS))})")
    model: str = option("smollm2-135m", help="base model")
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = option(None, help=f"subset of: {' '.join(METHODS)}")
    n_train: int = option(96, min=1, help="training examples")
    n_test: int = option(512, min=1, help="test examples")
    n_nonmembers: int = 48
    n_holdout: int = 24
    removal_unit: Literal["example", "user"] = option(
        "example", help="removal task: remove `ratios` of the examples, or every example of `ratios` of the users")
    history_length: int = 3
    data_seed: int = 0
    sisa_shards: int = 4
    cache_method: str = option("ekfac", choices=curvature_methods, help="curvature fitted once for llmeraser_cached")
    calibration_examples: int = 8
    calibration_directions: int = 4
    trust_region_steps: int = option(TrustRegionSettings.steps, min=1, help="llmeraser_tr's steps at most")
    quantise_bits: tuple[int, ...] = option((8, 4), min=2, help="bit widths of the quantisation check (none: not run)")
    relearn_steps: int = option(5, min=0, help="steps of the relearning attack (0: not run)")
    relearn_examples: int = option(8, min=0, help="kept examples the relearning attack fine-tunes on")
    query_mode: NextItemMode = option(
        "replace", help="next-item task: noisy history items restored (replace) or history items deleted (delete)")
    n_candidates: int = 20
    lora: LoraSettings = SMOLLM2_LORA
    recipe: TrainConfig = SMOLLM2_RECIPE
    eraser: EraseConfig = field(default_factory=lambda: smollm2_erase_config(auto_damping=True))

    def __post_init__(self) -> None:
        validate(self)

    def chosen_methods(self) -> tuple[str, ...]:
        """The methods to run (the task's defaults when ``methods`` is None), always with ``original`` and
        ``retrain`` (both are trained in any case: the start of every update and the reference)."""
        methods = self.methods or DEFAULT_METHODS[self.task]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (expected: {', '.join(METHODS)})")
        if self.task == "removal" and "finetune" in methods:
            raise ValueError("finetune needs corrected examples; the removal task has none")
        return tuple(m for m in METHODS if m in methods or m in ("original", "retrain"))

    def validate(self) -> None:
        """What the declaration does not say (``__post_init__`` checks the declared fields)."""
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        self.chosen_methods()


def quick_config(task: BenchTask) -> BenchConfig:
    """The protocol on the tiny random-init model and a few dozen examples: seconds, for the test suite."""
    return BenchConfig(
        task=task,
        model="tiny",
        ratios=(0.1,),
        seeds=(0, 1),
        methods=("llmeraser", *DEFAULT_METHODS[task]),  # the smoke run exercises the cold update too
        n_train=20,
        n_test=12,
        n_nonmembers=6,
        n_holdout=6,
        trust_region_steps=2,
        history_length=1,
        sisa_shards=2,
        lora=TINY_LORA,
        recipe=TrainConfig(epochs=3, lr=1e-2, batch_size=8, weight_decay=1e-2, max_length=384),
        eraser=EraseConfig(solver="cg", curvature="gauss-newton", damping=0.1, weight_decay=1e-2, max_iters=8,
                           tol=1e-3, max_length=384, curvature_examples=12, batch_size=12, auto_damping=True),
    )


def pii_config(quick: bool = False) -> BenchConfig:
    """The generative scenario: memorisation needs more epochs and a higher learning rate."""
    if quick:
        return dataclasses.replace(
            quick_config("pii"), n_train=8, n_nonmembers=4, n_holdout=2, ratios=(0.125,),
            recipe=TrainConfig(epochs=6, lr=1e-2, batch_size=8, weight_decay=1e-3, max_length=128),
        )
    return BenchConfig(
        task="pii", ratios=(0.1,), n_train=24, n_nonmembers=8, n_holdout=4,
        recipe=TrainConfig(epochs=10, lr=2e-3, batch_size=8, weight_decay=1e-3, max_length=64, lr_schedule="linear"),
        eraser=EraseConfig(solver="cg", curvature="gauss-newton", damping=1e-2, weight_decay=1e-3, max_iters=8,
                           tol=1e-3, max_length=64, curvature_examples=24, batch_size=8, auto_damping=True),
    )


def task_config(task: BenchTask, quick: bool = False) -> BenchConfig:
    """The protocol's configuration of ``task`` (``quick``: on the tiny model, in seconds)."""
    if task == "pii":
        return pii_config(quick)
    if task == "next-item":
        return next_item_config(quick)
    if task == "removal" and not quick:  # a removal's effect grows with its size: three sizes, drawn as a curve
        return BenchConfig(task=task, ratios=REMOVAL_RATIOS)
    return quick_config(task) if quick else BenchConfig(task=task)


def next_item_config(quick: bool = False) -> BenchConfig:
    """The next-item task, sized for 2 CPU cores: 5 history items and 10 candidates (~250 SmolLM2 tokens per
    prompt; LLaRA's 10 and 20 give ~450, and one 2-epoch training of 96 such examples took 25 minutes on one
    core), 32 training examples, 64 test prompts decoded greedily, 16 non-members, 10 % of the prompts edited
    (``--n-train``, ``--n-test``, ``--ratio`` override). Its requests edit prompts and delete no answer, so the
    quantisation and relearning attacks (which ask whether deleted data comes back) are off, SISA is not a default
    method, and the trust region takes 3 steps (each ~4 minutes at 250-token prompts on one core); the options
    (``--quantise-bits``, ``--relearn-steps``, ``--methods``, ``--trust-region-steps``) turn them back on.
    ``quick``: the tiny model with 1 history item and 5
    candidates (byte-level prompts of ~250 tokens; with 20 candidates, ~800 tokens, the smoke run took ~7
    minutes on 2 busy cores)."""
    if quick:
        base = quick_config("next-item")
        return dataclasses.replace(base, n_test=6, history_length=1, n_candidates=5, methods=(*(base.methods or ()), "sisa"),
                                   recipe=dataclasses.replace(base.recipe, max_length=512),
                                   eraser=dataclasses.replace(base.eraser, max_length=512, curvature_examples=8, batch_size=8))
    return BenchConfig(task="next-item", history_length=5, n_candidates=10, ratios=(0.1,), n_train=32, n_test=64,
                       n_nonmembers=16, n_holdout=8, trust_region_steps=3, quantise_bits=(), relearn_steps=0,
                       recipe=dataclasses.replace(SMOLLM2_RECIPE, max_length=320),
                       eraser=smollm2_erase_config(auto_damping=True, max_length=320))


def _data_path(config: BenchConfig) -> str | None:
    return None if config.data == "ml-100k" else config.data


def forgotten_examples(task: str, sets: EvalSets) -> list[Example]:
    """What must be forgotten: the removed people's examples (``pii``; not the corrected ones), else the
    edited examples' training-set versions (removed examples, noisy prompts, flipped labels)."""
    if task != "pii":
        return list(sets.old)
    corrected = {e.id for e in sets.new}
    return [e for e in sets.old if e.id not in corrected]


def with_relearn_set(config: BenchConfig, task: Any, sets: EvalSets) -> EvalSets:
    """``sets`` with the relearning attack's set: ``relearn_examples`` kept (never edited) examples of the
    training set, of the forgotten examples' users or people first (``bench.robustness.relearn_set``)."""
    edited = {r.id for r in task.requests}
    kept = [e for e in task.target if e.id not in edited]
    forgotten = forgotten_examples(config.task, sets)
    return dataclasses.replace(sets, relearn=relearn_set(kept, forgotten, config.relearn_examples, config.data_seed))


def prepare_ratio(config: BenchConfig, ratio: float) -> tuple[Any, EvalSets]:
    """The corrupted task and the evaluation sets for one ratio (drawn with ``data_seed``)."""
    if config.task == "pii":
        task, sets = pii_task(config.n_train, config.n_nonmembers, ratio, config.data_seed, config.n_holdout)
        return task, with_relearn_set(config, task, sets)
    if config.task == "next-item":
        return _prepare_next_item(config, ratio)
    splits = sample_tallrec(
        config.n_train + config.n_nonmembers + config.n_holdout, config.n_test, config.history_length,
        config.data_seed, path=_data_path(config), format=config.format, n_valid=0,
    )
    pool = list(splits.train)
    drawn = random.Random(f"{config.data_seed}:nonmembers").sample(range(len(pool)), config.n_nonmembers + config.n_holdout)
    nonmember_at, holdout_at = set(drawn[: config.n_nonmembers]), set(drawn[config.n_nonmembers :])
    nonmembers = [e for k, e in enumerate(pool) if k in nonmember_at]
    holdout = [e for k, e in enumerate(pool) if k in holdout_at]
    splits = dataclasses.replace(splits, train=[e for k, e in enumerate(pool) if k not in nonmember_at | holdout_at])
    options = {"by_user": True} if config.task == "removal" and config.removal_unit == "user" else {}
    task = make_task(splits, config.task, ratio, config.data_seed, **options)
    pairs = resolve(task.requests, task.train)
    sets = EvalSets(
        test=list(splits.test),
        old=[p.old for p in pairs],
        new=[p.new for p in pairs if p.new is not None],
        nonmembers=nonmembers,
        holdout=holdout,
    )
    return task, with_relearn_set(config, task, sets)


def _prepare_next_item(config: BenchConfig, ratio: float) -> tuple[Any, EvalSets]:
    splits = sample_next_item(config.n_train + config.n_nonmembers + config.n_holdout, config.n_test, config.history_length,
                              config.data_seed, n_candidates=config.n_candidates, path=_data_path(config), format=config.format)
    pool = list(splits.train)
    drawn = random.Random(f"{config.data_seed}:nonmembers").sample(range(len(pool)), config.n_nonmembers + config.n_holdout)
    nonmember_at, holdout_at = set(drawn[: config.n_nonmembers]), set(drawn[config.n_nonmembers :])
    train = [e for k, e in enumerate(pool) if k not in nonmember_at | holdout_at]
    task = next_item_query_task(splits, ratio, config.data_seed, mode=config.query_mode, train=train)
    pairs = resolve(task.requests, task.train)
    sets = EvalSets(test=list(splits.test), old=[p.old for p in pairs], new=[p.new for p in pairs if p.new is not None],
                    nonmembers=[e for k, e in enumerate(pool) if k in nonmember_at],
                    holdout=[e for k, e in enumerate(pool) if k in holdout_at])
    return task, with_relearn_set(config, task, sets)


@dataclass
class SeedStart:
    """What one seed trains or fits before any request is known: the original adapter, the curvature cache
    and SISA's shard adapters, each with its measured cost (``measured`` records). Shared by the ratios whose
    training set is the same (removal and pii: the ratio picks the requests, not the data), so that a run
    over several ratios trains each seed's original once. ``train_key`` identifies the training set."""

    train_key: str
    theta_original: Tensor
    costs: dict[str, Any] = field(default_factory=dict)
    cache: Any = None
    cache_extras: dict[str, Any] | None = None
    sisa: Any = None

    @staticmethod
    def key(train: Sequence[Example]) -> str:
        """The training set's content, in order (ids, texts, messages): equal keys, the same original."""
        text = json.dumps([asdict(e) for e in train], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def run_seed(
    config: BenchConfig, task: Any, sets: EvalSets, seed: int, log: Callable[[str], None],
    start: SeedStart | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All methods for one training seed; returns the scored rows and ``extras`` (retrained θ, solver
    residual history, the retrained model's predictions for the seed-to-seed spread, and ``start``: the
    seed's ``SeedStart``). ``start``: an earlier ratio's, reused when its training set is this task's."""
    base, tokenizer = load_base_model(config.model, seed=config.data_seed)
    model = attach_lora(base, dataclasses.replace(config.lora, seed=seed))
    params = AdapterParameters.of(model)
    recipe = dataclasses.replace(config.recipe, seed=seed)
    theta_init = params.flat()
    pairs = resolve(task.requests, task.train)
    methods = config.chosen_methods()
    cost: dict[str, Any] = {}
    thetas: dict[str, list[Tensor]] = {}
    extras: dict[str, Any] = {}

    train_key = SeedStart.key(task.train)
    if start is not None and start.train_key == train_key:
        log(f"  seed {seed}: the original on these {len(task.train)} examples was trained for an earlier ratio: reused")
        cost.update(start.costs)
    else:
        log(f"  seed {seed}: train original on {len(task.train)} examples")
        with measured(cost, "original"):
            train_adapter(model, tokenizer, task.train, recipe)
        start = SeedStart(train_key, params.flat(), {"original": cost["original"]})
    theta_original = start.theta_original
    thetas["original"] = [theta_original]
    extras["start"] = start

    log(f"  seed {seed}: retrain on {len(task.target)} examples, paired (the original's data order)")
    params.assign(theta_init)
    schedule = paired_schedule([e.id for e in task.train], [e.id for e in task.target], recipe)
    with measured(cost, "retrain"):
        train_adapter(model, tokenizer, task.target, recipe, schedule=schedule)
    thetas["retrain"] = [params.flat()]

    if "llmeraser" in methods:
        log(f"  seed {seed}: llmeraser ({config.eraser.solver}, {config.eraser.curvature})")
        params.assign(theta_original)
        with measured(cost, "llmeraser"):
            result = erase(model, tokenizer, task.train, task.requests, dataclasses.replace(config.eraser, seed=seed))
        thetas["llmeraser"] = [result.theta_new]
        extras["residual_history"] = [float(r) for r in result.solver.residuals]
        extras["erase_report"] = {k: result.report[k] for k in ("solver", "damping_used", "timings_s", "n_curvature_examples")}
    if "llmeraser_cached" in methods or "llmeraser_tr" in methods:
        params.assign(theta_original)
        eraser = dataclasses.replace(config.eraser, seed=seed, curvature_use="direct", auto_damping=False)
        if start.cache is None:
            log(f"  seed {seed}: fit a {config.cache_method} curvature once")
            items = tokenize_examples(tokenizer, task.train, TokenizationConfig(eraser.max_length))
            with measured(cost, "llmeraser_cached_fit"):
                start.cache = fit_cached_curvature(
                    model, params, items, tokenizer.pad_token_id, config.cache_method, damping=eraser.damping,
                    weight_decay=eraser.weight_decay, curvature=eraser.curvature, batch_size=eraser.batch_size, seed=seed,
                    calibration_examples=config.calibration_examples, calibration_directions=config.calibration_directions,
                )
            start.costs["llmeraser_cached_fit"] = cost["llmeraser_cached_fit"]
            calibration = start.cache.calibration
            start.cache_extras = {"method": config.cache_method, "fit": cost["llmeraser_cached_fit"],
                                  "step_length": calibration.step_length if calibration else None,
                                  "calibration_residuals": list(calibration.residuals) if calibration else []}
            extras["cache"] = start.cache_extras
        else:
            log(f"  seed {seed}: the {config.cache_method} curvature fitted for an earlier ratio: reused")
            extras["cache"] = {**(start.cache_extras or {}), "reused": True}
        cache = start.cache
        calibration = cache.calibration
        if "llmeraser_cached" in methods:
            log(f"  seed {seed}: llmeraser_cached (one step, {config.cache_method})")
            with measured(cost, "llmeraser_cached"):
                cached = erase(model, tokenizer, task.train, task.requests, eraser, curvature_cache=cache.layers,
                               calibration=calibration)
            thetas["llmeraser_cached"] = [cached.theta_new]
        if "llmeraser_tr" in methods:
            log(f"  seed {seed}: llmeraser_tr (up to {config.trust_region_steps} trust-region steps, {config.cache_method})")
            tr_config = dataclasses.replace(eraser, trust_region=True, trust_region_steps=config.trust_region_steps)
            with measured(cost, "llmeraser_tr"):
                refined = erase(model, tokenizer, task.train, task.requests, tr_config, curvature_cache=cache.layers,
                                calibration=calibration, heldout=sets.holdout)
            thetas["llmeraser_tr"] = [refined.theta_new]
            extras["trust_region"] = refined.report["trust_region"]
    if "gradient_ascent" in methods:
        log(f"  seed {seed}: gradient ascent on {len(sets.old)} removed examples")
        params.assign(theta_original)
        with measured(cost, "gradient_ascent"):
            gradient_ascent(model, tokenizer, [p.old for p in pairs if p.new is None], recipe, epochs=recipe.epochs)
        thetas["gradient_ascent"] = [params.flat()]
    if "finetune" in methods:
        log(f"  seed {seed}: continued fine-tuning on {len(sets.new)} corrected examples")
        params.assign(theta_original)
        with measured(cost, "finetune"):
            continued_finetuning(model, tokenizer, pairs, recipe)
        thetas["finetune"] = [params.flat()]
    if "sisa" in methods:
        log(f"  seed {seed}: SISA, {config.sisa_shards} shards")
        if start.sisa is None:
            with measured(cost, "sisa_initial"):
                start.sisa = train_sisa(model, tokenizer, task.train, theta_init, config.sisa_shards, recipe, seed)
            start.costs["sisa_initial"] = cost["sisa_initial"]
        sisa = start.sisa
        with measured(cost, "sisa"):
            sisa = unlearn_sisa(model, tokenizer, sisa, task.train, pairs, theta_init, recipe)
        thetas["sisa"] = sisa.members
        extras["sisa_affected_shards"] = len(sisa.affected(pairs))
        extras["sisa_initial"] = cost["sisa_initial"]

    log(f"  seed {seed}: scoring {len(thetas)} methods")
    score = {"pii": score_pii, "next-item": score_next_item}.get(config.task, score_method)
    max_length = config.recipe.max_length
    reference = predict_sets(model, tokenizer, thetas["retrain"], sets, max_length)
    forgotten = forgotten_examples(config.task, sets)
    rows = []
    for method in methods:
        predictions = reference if method == "retrain" else predict_sets(model, tokenizer, thetas[method], sets, max_length)
        metrics = score(model, tokenizer, thetas[method], sets, predictions, reference, max_length)
        log(f"  seed {seed}: attacking {method} (quantised to {', '.join(map(str, config.quantise_bits)) or 'no'} bits, "
            f"{config.relearn_steps} relearning steps on {len(sets.relearn)} kept examples)")
        metrics.update(attack_metrics(model, tokenizer, thetas[method], forgotten, sets.nonmembers, sets.relearn, recipe,
                                      bits=config.quantise_bits, steps=config.relearn_steps, extract=config.task == "pii"))
        rows.append({"method": method, "seed": seed, **metrics, **cost[method]})
    params.assign(theta_original)
    extras["reference"] = reference
    return rows, extras


def retrain_spread(references: Sequence[SetPredictions]) -> list[dict[str, float]]:
    """KL between the retrained models of consecutive seeds (both directions), on the test and edited sets."""
    spread = []
    for a, b in zip(references, references[1:]):
        for first, second in ((a, b), (b, a)):
            spread.append({"kl_test": float(first.test.kl_to(second.test).mean()),
                           "kl_edited": float(first.edited.kl_to(second.edited).mean())})
    return spread


def run_bench(
    config: BenchConfig, log: Callable[[str], None] = print, command: str = "",
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol for every ratio and seed; returns the results (see ``bench.report``).
    ``checkpoint`` receives a copy of the results so far after every seed (``complete`` False, the seeds
    done in ``seeds_done``), so that an interrupted run leaves what it measured."""
    config.validate()
    results: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "rows": [],
        "spread": [],
        "residuals": [],
        "sisa": [],
        "caches": [],
        "requests": {},
        "complete": False,
        "seeds_done": [],
    }
    starts: dict[int, SeedStart] = {}  # per seed, what the next ratio may reuse (same training set)
    for ratio in config.ratios:
        task, sets = prepare_ratio(config, ratio)
        results["requests"][str(ratio)] = len(task.requests)
        log(f"{config.task} at ratio {ratio}: {len(task.requests)} requests, {len(task.train)} training examples")
        references = []
        for seed in config.seeds:
            rows, extras = run_seed(config, task, sets, seed, log, starts.get(seed))
            starts[seed] = extras["start"]
            results["rows"].extend({"ratio": ratio, **row} for row in rows)
            references.append(extras["reference"])
            if "residual_history" in extras:
                results["residuals"].append({"ratio": ratio, "seed": seed, "history": extras["residual_history"],
                                             "erase_report": extras["erase_report"]})
            if "cache" in extras:
                results["caches"].append({"ratio": ratio, "seed": seed, **extras["cache"]})
            if "trust_region" in extras:  # every step, why it stopped, the acceptance checks
                results.setdefault("trust_region", []).append({"ratio": ratio, "seed": seed, **extras["trust_region"]})
            if "sisa_initial" in extras:
                results["sisa"].append({"ratio": ratio, "seed": seed, "affected_shards": extras["sisa_affected_shards"],
                                        "shards": config.sisa_shards, "initial_training": extras["sisa_initial"]})
            results["seeds_done"].append({"ratio": ratio, "seed": seed})
            if checkpoint is not None:
                partial = copy.deepcopy(results)
                partial["spread"].extend({"ratio": ratio, **row} for row in retrain_spread(references))
                partial["machine_at_end"] = {"load_average_1_5_15_min": machine()["load_average_1_5_15_min"]}
                checkpoint(partial)
        results["spread"].extend({"ratio": ratio, **row} for row in retrain_spread(references))
    results["complete"] = True
    results["machine_at_end"] = {"load_average_1_5_15_min": machine()["load_average_1_5_15_min"]}
    return results

