"""The adapter lifecycle as one object: load an adapter with its checks, check the training data against its
record, fit the curvature once, erase, and save the result with its training record, lineage and report.

    adapter = Adapter.load("adapters/original")      # base model from the training record or adapter_config.json
    adapter.check(train)                              # base model, data and lengths, against the record
    cache = adapter.fit_curvature(train)              # optional: each later erase costs about its own gradients
    erased = adapter.erase(train, requests, cache=cache)
    erased.report.to_json()
    erased.save("adapters/erased")                    # weights, training record, lineage, report: atomically

``llmeraser erase`` and ``llmeraser fit-curvature`` run exactly this code, so a notebook or a service gets
the checks, records and lineage the command line gets.

An adapter trained outside llmeraser has no training record: the recipe values an erasure depends on
(weight decay, max length, loss scope) are then required (``Adapter.load(..., weight_decay=...,
max_length=..., loss_scope=...)``, on the command line ``--weight-decay``, ``--max-length``, ``--loss-scope``)
and the load is refused without them; the first erase writes the record it assumed into its output, so the
next erase of the result is checked against it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmeraser.adapter import LoraSettings, adapter_config, check_adapter_fits, load_adapter
from llmeraser.curvature.cache import CurvatureCache
from llmeraser.curvature.calibration import StepCalibration
from llmeraser.data import Example
from llmeraser.distributed import wait_for_rank_zero
from llmeraser.errors import ConfigError, InputError, NumericalError
from llmeraser.estimate import RunEstimate
from llmeraser.hashing import adapter_hash, combine_parts, dataset_hash, fingerprint_parts
from llmeraser.lineage import LINEAGE_FILE, append_entry, erase_entry, lineage_text, read_lineage, verify_chain
from llmeraser.models import DTYPES, load_base_model
from llmeraser.plan import EraseRun
from llmeraser.provenance import (
    ORIGIN_ASSUMED,
    TRAINING_RECORD,
    TrainingRecord,
    read_training_record,
)
from llmeraser.train import Schedule, TrainConfig

REPORT_FILE = "erasure_report.json"
RECIPE_FIELDS = ("weight_decay", "max_length", "loss_scope")
"""The recipe values an erasure depends on (``TrainConfig`` fields; for an adapter without a record they must
be given)."""
RECIPE_MEANING = {
    "weight_decay": "the L2 coefficient of the training objective; for AdamW's decoupled decay see llmeraser.integrations",
    "max_length": "the max tokens per example",
    "loss_scope": "which tokens carried the loss: response, assistant or all",
}


spell_options: Callable[[str], str] | None = None
"""Rewrites the options a notice names (`` `max_length=128` ``, as fields) for its reader: the CLI sets it to
spell them as its flags; None leaves them as they are."""


def note(message: str) -> None:
    """A one-line notice on stderr (``llmeraser: note: ...``)."""
    print(f"llmeraser: note: {spell_options(message) if spell_options else message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"llmeraser: warning: {spell_options(message) if spell_options else message}", file=sys.stderr)


def require_adapter(adapter: str | Path) -> Path:
    """``adapter`` as a Path; an input error unless it is a PEFT adapter directory with safetensors weights."""
    path = Path(adapter)
    if not path.is_dir():
        raise InputError("adapter directory not found", path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise InputError(f"not a PEFT adapter directory with safetensors weights (no {name})", path)
    return path


def refuse_nonfinite_adapter(adapter: str | Path) -> None:
    """NumericalError (stage 'adapter') when the adapter's stored weights hold NaN or Inf."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    if not all(bool(torch.isfinite(t).all()) for t in weights.values()):
        raise NumericalError("the input adapter's weights contain NaN or Inf", stage="adapter")


def input_lineage(adapter: str | Path, adapter_sha256: str, allow_mismatch: bool) -> tuple[list[dict], list[str]]:
    """The input adapter's lineage entries to carry over, and its problems (refused unless allowed)."""
    try:
        entries = read_lineage(adapter)
    except InputError as err:
        if not allow_mismatch:
            raise InputError(f"{err} (the input adapter's lineage is unreadable; see `llmeraser history {adapter}`; "
                             "`allow_mismatch` starts a new lineage)") from None
        return [], [f"unreadable {LINEAGE_FILE}: {err}"]
    record = read_training_record(adapter)
    problems = verify_chain(entries, adapter_sha256, record.data_sha256 if record else None)
    if problems and not allow_mismatch:
        raise InputError(f"its {LINEAGE_FILE} does not verify: {problems[0]} (see `llmeraser history {adapter}`; "
                         "pass `allow_mismatch=True` to proceed knowingly)", adapter)
    return entries, [f"{LINEAGE_FILE}: {problem}" for problem in problems]


def lineage_data_hint(lineage: Sequence[dict], data_sha256: str, data_path: str) -> str:
    """When the given data is an earlier state of the adapter's training set, say how to get the current one."""
    erases = [entry for entry in lineage if entry.get("command") == "erase"]
    for position, entry in enumerate(erases):
        if entry.get("data_before_sha256") == data_sha256:
            later = len(erases) - position
            return (
                f". {data_path} is the training data as it was before erase entry #{entry.get('index')}; this adapter "
                f"stands for the set after {later} more erase(s): build it with `llmeraser apply-requests --data "
                f"{data_path} --requests <the request files of those erases, in order> --out edited.jsonl` "
                "(their hashes are in `llmeraser history`) and pass that as the training data"
            )
    return ""


def base_model_name(model: str | None, record: TrainingRecord | None, adapter: str | Path) -> str:
    """The base model to load: ``model``, else the training record's, else ``adapter_config.json``'s
    ``base_model_name_or_path``."""
    if model:
        return model
    if record is not None:
        return record.model
    name = adapter_config(adapter).get("base_model_name_or_path")
    if not name:
        raise InputError("`model` is required: the adapter has no llmeraser training record and its "
                         "adapter_config.json names no base_model_name_or_path", adapter)
    return str(name)


def chat_template_hash(tokenizer: Any) -> str | None:
    """SHA-256 of the tokenizer's chat template (None without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _lora_from_config(adapter: str | Path) -> LoraSettings:
    config = adapter_config(adapter)
    targets = config.get("target_modules") or ()
    return LoraSettings(int(config.get("r", 8)), float(config.get("lora_alpha", 8)), float(config.get("lora_dropout") or 0.0),
                        (targets,) if isinstance(targets, str) else tuple(sorted(targets)), 0)


def recipe_for(
    record: TrainingRecord | None, adapter: str | Path, weight_decay: float | None, max_length: int | None,
    loss_scope: str | None,
) -> TrainConfig:
    """The recipe an erasure uses: the record's, with the values given here in its place (a value that
    differs from the recorded one is warned about: the record's is the one training minimised). Without a
    record every one of ``RECIPE_FIELDS`` must be given: refused otherwise, naming them."""
    given: dict[str, Any] = {"weight_decay": weight_decay, "max_length": max_length, "loss_scope": loss_scope}
    if record is None:
        missing = [name for name in RECIPE_FIELDS if given[name] is None]
        if missing:
            raise InputError(
                "the adapter has no llmeraser training record (it was trained outside llmeraser), so the recipe "
                f"values the erasure depends on are unknown: pass {', '.join(f'`{n}`' for n in missing)} "
                f"({'; '.join(RECIPE_MEANING[n] for n in missing)})", adapter)
        return TrainConfig(**{name: value for name, value in given.items()})
    recipe = record.recipe
    for name, value in given.items():
        if value is not None and value != getattr(recipe, name):
            warn(f"`{name}={value}` differs from the adapter's recorded {getattr(recipe, name)} "
                 "(the recorded value is the one its training used)")
    return replace(recipe, **{name: value for name, value in given.items() if value is not None})


@dataclass
class ErasureReport:
    """What an erasure did (``erasure_report.json``): request counts, affected examples (hashes), the
    solver's diagnostics, timings, versions. Read it as a mapping (``report["solver"]``) or by the typed
    properties; ``to_json()`` is the file's content."""

    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def update(self, values: Mapping[str, Any]) -> None:
        self.data.update(values)

    @property
    def requests(self) -> dict[str, int]:
        return self.data["requests"]

    @property
    def method(self) -> str:
        return self.data.get("method", "update")

    @property
    def solver(self) -> dict[str, Any]:
        return self.data["solver"]

    @property
    def update_norm(self) -> float | None:
        return self.data.get("update_norm")

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)


@dataclass
class ErasedAdapter:
    """An erasure's result before it is written: the new weights (``theta`` on ``model``), the report, and
    what ``save`` writes beside them."""

    source: Adapter
    model: Any
    theta: Any
    report: ErasureReport
    data_before_sha256: str
    edited: list[Example]
    result: Any = None  # the ErasureResult of an update (None for a retrain)

    @property
    def pairs(self) -> list[Any]:
        return self.result.pairs if self.result is not None else []

    def training_record(self) -> dict[str, Any]:
        """The erased adapter's training record: the input's (recorded or assumed), for the edited set."""
        record = self.source.stored_record or self.source.record
        return {**record.to_json(), "data_sha256": dataset_hash(self.edited), "n_examples": len(self.edited)}

    def save(self, out: str | Path) -> Path:
        """Write the erased adapter to the new directory ``out``, atomically: ``adapter_model.safetensors`` +
        ``adapter_config.json``, ``erasure_report.json`` (with the written weights' hash), the training record
        and ``lineage.jsonl`` (the input's entries and this erasure's). Refuses an existing ``out`` and one
        that is, or is inside, the input adapter."""
        from llmeraser.adapter import save_adapter
        from llmeraser.eraser import erased_adapter_files

        out = Path(out)
        refuse_output(out, self.source.path)
        edited_hash = dataset_hash(self.edited)

        def files(written: Path) -> dict[str, Any]:
            output_hash = adapter_hash(written)
            report = {**self.report.to_json(), "output_adapter_sha256": output_hash}
            entry = erase_entry(report, output_hash, self.data_before_sha256, edited_hash, len(self.edited))
            return erased_adapter_files(self.report.to_json(), written, {  # the report, the model card
                TRAINING_RECORD: self.training_record(), LINEAGE_FILE: lineage_text(append_entry(self.source.lineage, entry))})

        return save_adapter(self.model, out, self.theta, files)


def refuse_output(out: str | Path, adapter: str | Path) -> None:
    """An input error when ``out`` exists, or is or lies inside the input ``adapter``."""
    out, adapter = Path(out), Path(adapter)
    if out.exists():
        raise InputError("output directory already exists (choose a new one; nothing is overwritten)", out)
    if out.resolve() == adapter.resolve():
        raise InputError("`out` must differ from `adapter` (the input adapter is never modified)", out)
    if adapter.resolve() in out.resolve().parents:
        raise InputError("`out` may not be inside `adapter` (the input adapter is never modified)", out)


@dataclass
class Adapter:
    """A PEFT adapter with its base model, its training record (as recorded, or as assumed for an adapter
    trained outside llmeraser: ``recorded`` False) and its verified lineage. Build it with ``Adapter.load``."""

    path: Path
    base: Any
    tokenizer: Any
    record: TrainingRecord
    recorded: bool
    input_sha256: str
    lineage: list[dict[str, Any]]
    fingerprint_parts: dict[str, str]
    allow_mismatch: bool = False
    problems: list[str] = field(default_factory=list)
    stored_record: TrainingRecord | None = None  # as read (or assumed): what an erased adapter's record is made from
    given: dict[str, Any] = field(default_factory=dict)  # the recipe values given to load
    truncated: int = 0  # examples of the last checked data whose prompts are cut to fit max_length
    _model: Any = None
    _checked: str | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: str | None = None,
        *,
        weight_decay: float | None = None,
        max_length: int | None = None,
        loss_scope: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        allow_mismatch: bool = False,
    ) -> Adapter:
        """Load the adapter at ``path`` and its base model: ``model``, else the one its training record names,
        else ``adapter_config.json``'s ``base_model_name_or_path`` (in ``dtype``; the adapter stays float32).

        Refused (``InputError``): not a PEFT directory, NaN/Inf weights, a lineage that does not verify, a base
        model whose weights do not fit the adapter (the names and both shapes), and, for an adapter without a
        training record, any of ``weight_decay``, ``max_length``, ``loss_scope`` not given. Given with a record,
        they replace the recorded values (with a warning when they differ). ``allow_mismatch``: lineage and
        base-model / data mismatches are recorded in the report instead of refused."""
        path = require_adapter(path)
        refuse_nonfinite_adapter(path)
        input_sha256 = adapter_hash(path)
        lineage, problems = input_lineage(path, input_sha256, allow_mismatch)
        record = read_training_record(path)
        recipe = recipe_for(record, path, weight_decay, max_length, loss_scope)
        name = base_model_name(model, record, path)
        base, tokenizer = load_base_model(name, seed=record.recipe.seed if record else 0, dtype=DTYPES[dtype],
                                          trust_remote_code=trust_remote_code)
        check_adapter_fits(base, path)
        lora = record.lora if record else _lora_from_config(path)
        parts = fingerprint_parts(base, lora.target_modules)
        if record is None:
            record_used = TrainingRecord(name, combine_parts(parts), "", 0, recipe, lora, parts, ORIGIN_ASSUMED,
                                         chat_template_hash(tokenizer))
        else:
            record_used = replace(record, recipe=recipe)
        given = {k: v for k, v in {"weight_decay": weight_decay, "max_length": max_length,
                                   "loss_scope": loss_scope}.items() if v is not None}
        return cls(path, base, tokenizer, record_used, record is not None, input_sha256, lineage, parts,
                   allow_mismatch, problems, record or record_used, given)

    @property
    def model(self) -> Any:
        """The PEFT model (base + this adapter, θ trainable), loaded on first use."""
        if self._model is None:
            self._model = load_adapter(self.base, self.path)
        return self._model

    @property
    def recipe(self) -> TrainConfig:
        return self.record.recipe

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint over the weights the adapter depends on (``model_fingerprint``)."""
        return combine_parts(self.fingerprint_parts)

    def erase_config(self, **overrides: Any) -> Any:
        """An ``EraseConfig`` with the recipe's weight decay, max length and loss scope, and ``overrides``."""
        from llmeraser.eraser import EraseConfig

        recipe = self.recipe
        return EraseConfig(**{"weight_decay": recipe.weight_decay, "max_length": recipe.max_length,
                              "loss_scope": recipe.loss_scope, **overrides})

    def check(self, train: Sequence[Example], data_path: str | Path | None = None, requests: Sequence[Any] = ()) -> list[str]:
        """Check ``train`` (and the replacements of ``requests``) against the adapter: the base model's
        fingerprint and the data's hash against the training record (refused unless ``allow_mismatch``;
        an assumed record has no data to compare), the chat template, and that every example fits the
        recipe's ``max_length``. Returns the mismatches allowed (empty when all match)."""
        from llmeraser.provenance import check_matches
        from llmeraser.validate import check_examples_fit, check_max_length

        location = str(data_path) if data_path is not None else getattr(train, "source", None) or "the training data"
        problems: list[str] = []
        if self.recorded:
            try:
                problems = check_matches(self.record, self.path, self.base, train, location, self.allow_mismatch,
                                         self.fingerprint_parts)
            except InputError as err:
                hint = lineage_data_hint(self.lineage, dataset_hash(train), location)
                raise InputError(err.message + hint, err.path) from None
        template = chat_template_hash(self.tokenizer)
        if (self.record.chat_template_sha256 and any(e.is_conversation for e in train)
                and template != self.record.chat_template_sha256):
            problem = "the tokenizer's chat template is not the one the adapter was trained with"
            if not self.allow_mismatch:
                raise InputError(problem + " (pass `allow_mismatch=True` to proceed knowingly)", self.path)
            problems.append(problem)
        recipe = self.recipe
        check_max_length(recipe.max_length, self.base, "`max_length`" if "max_length" in self.given else "the training recipe's")
        self.truncated = check_examples_fit(self.tokenizer, train, recipe.max_length, data_path, requests, self.base,
                                            recipe.loss_scope)
        self._checked = dataset_hash(train)
        self.problems = [p for p in self.problems if p.startswith(LINEAGE_FILE)] + problems
        return problems

    def _ensure_checked(self, train: Sequence[Example], requests: Sequence[Any] = ()) -> str:
        data_hash = dataset_hash(train)
        if self._checked != data_hash:
            self.check(train, requests=requests)
        return data_hash

    def curvature_key(self, train: Sequence[Example]) -> dict[str, str]:
        """The hashes a curvature cache of this adapter and data is stored with (and checked against)."""
        return {"model_fingerprint": self.fingerprint, "adapter_sha256": self.input_sha256,
                "data_sha256": dataset_hash(train)}

    def default_curvature_path(self, train: Sequence[Example], method: str = "ekfac") -> Path:
        """Where the default erase keeps this adapter's curvature for ``train`` (the user cache)."""
        from llmeraser.curvature.cache import default_cache_path

        return default_cache_path(self.input_sha256, dataset_hash(train), self.fingerprint, method)

    def fit_curvature(self, train: Sequence[Example], out: str | Path | None = None, config: Any = None) -> CurvatureCache:
        """Fit a curvature cache (``llmeraser.curvature.CurvatureFitConfig``; default EK-FAC) for this
        adapter and ``train`` with the recipe's max length, loss scope and weight decay, written to ``out``
        (a new directory; None: kept in memory)."""
        from llmeraser.curvature.cache import CurvatureFitConfig, fit_curvature_cache

        self._ensure_checked(train)
        config = config or CurvatureFitConfig()
        recipe = self.recipe
        return fit_curvature_cache(
            self.model, self.tokenizer, self.base, train, self.input_sha256, out, method=config.method,
            curvature_examples=config.curvature_examples, max_length=recipe.max_length, loss_scope=recipe.loss_scope,
            weight_decay=recipe.weight_decay, calibration_damping=config.calibration_damping,
            calibration_examples=config.calibration_examples, calibration_directions=config.calibration_directions,
            batch_size=config.batch_size, seed=config.seed, datainf_damping=config.datainf_damping,
            model_fingerprint=self.fingerprint,
        )

    def load_curvature(self, path: str | Path, train: Sequence[Example]) -> CurvatureCache:
        """A curvature directory, refused unless fitted for this base model, adapter and ``train``."""
        return CurvatureCache.load(path, self.curvature_key(train))

    def erase(
        self,
        train: Sequence[Example],
        requests: Sequence[Any],
        config: Any = None,
        cache: CurvatureCache | None = None,
        *,
        heldout: Sequence[Example] | None = None,
        progress: bool = True,
        requests_sha256: str | None = None,
    ) -> ErasedAdapter:
        """The influence update for ``requests`` (``llmeraser.eraser.erase``) on ``train`` (checked first,
        as ``check`` does), with ``config`` (default ``erase_config()``: the recipe's weight decay, max
        length and loss scope; a config that differs from the recipe in them is warned about) and a fitted
        ``cache`` (used as ``config.curvature_use`` says). ``requests_sha256``: the request file's hash for
        the lineage (default: the hash of the requests' JSON). The adapter's weights are left unchanged."""
        from llmeraser.eraser import erase

        data_hash = self._ensure_checked(train, requests)
        config = config or self.erase_config()
        recipe = self.recipe
        for name in RECIPE_FIELDS:
            if getattr(config, name) != getattr(recipe, name):
                warn(f"the erase config's {name} {getattr(config, name)} differs from the adapter's recipe "
                     f"({getattr(recipe, name)})" + ("" if self.recorded else ", as given to Adapter.load"))
        result = erase(self.model, self.tokenizer, train, requests, config, progress=progress,
                       curvature_cache=cache.layers if cache else None, calibration=cache.calibration if cache else None,
                       heldout=heldout)
        from llmeraser.requests import edited_training_set

        report = ErasureReport(result.report)
        report.update(self._report_fields(requests, requests_sha256, heldout))
        report.update({"method": "update", "curvature_cache": str(cache.path) if cache and cache.path else None})
        return ErasedAdapter(self, self.model, result.theta_new, report, data_hash,
                             edited_training_set(train, result.pairs), result)

    def plan_erase(
        self,
        train: Sequence[Example],
        requests: Sequence[Any],
        *,
        mode: str = "auto",
        options: Mapping[str, Any] | None = None,
        curvature_cache: str | Path | None = None,
        heldout: Sequence[Example] | None = None,
    ) -> EraseRun:
        """Resolve what an erase of ``requests`` will run, before anything runs (``EraseRun``).

        ``mode``: ``auto`` (without solver ``options`` or a ``curvature_cache``: the cheaper of a paired retrain
        and the cached trust-region update, the EK-FAC curvature fitted on first use into the user cache;
        with them: the update they configure), ``update`` (the update as ``options`` say, the trust region
        on only if they ask) or ``retrain`` (a paired retrain; needs a reproducible training record).
        ``options``: ``EraseConfig`` fields given by the caller (the others keep their defaults and the
        recipe's weight decay, max length and loss scope); ``trust_region``/``trust_region_steps`` None:
        the mode's default. ``heldout``: counted in the automatic path's cost."""
        from llmeraser.plan import (
            AUTO_CACHE_METHOD,
            AUTO_TRUST_REGION_STEPS,
            SOLVER_FIELDS,
            auto_fit_config,
            dearer_than_retraining,
            plan_erase,
        )
        from llmeraser.requests import resolve

        if mode not in ("auto", "update", "retrain"):
            raise ConfigError("mode", f"must be one of auto, update, retrain, got {mode!r}")
        given = {k: v for k, v in (options or {}).items() if v is not None}
        pairs = resolve(requests, train)
        removed = sum(p.new is None for p in pairs)
        reproducible = self.recipe if self.record.reproducible else None
        if mode == "retrain" and reproducible is None:
            raise InputError("`mode=retrain` needs the adapter's training record (its recipe, as llmeraser train ran it)",
                             self.path)
        configured = curvature_cache is not None or any(name in given for name in SOLVER_FIELDS)
        if mode == "update" or (mode == "auto" and configured):
            config = self.erase_config(**{"trust_region": False, **given})
            cached_direct = curvature_cache is not None and config.curvature_use == "direct"
            warning = dearer_than_retraining(config, reproducible, len(train), removed, len(pairs), cached_direct)
            cache = self.load_curvature(curvature_cache, train) if curvature_cache is not None else None
            return EraseRun("update", mode, None, config, Path(curvature_cache) if curvature_cache else None, None,
                            warning, cache)
        defaults = self.erase_config(**given)
        cache_path = self.default_curvature_path(train, AUTO_CACHE_METHOD)
        fitted = (cache_path / "curvature.json").is_file()
        steps = given.get("trust_region_steps", AUTO_TRUST_REGION_STEPS) + given.get("trust_region_refit_steps", 0)
        choice = plan_erase(n_train=len(train), n_removed=removed, n_old=len(pairs), n_new=len(pairs) - removed,
                            recipe=reproducible, cache_fitted=fitted,
                            kept_examples=defaults.kept_examples,
                            heldout=len(heldout or ()), steps=steps)
        if mode == "retrain" or choice.choice == "retrain":
            return EraseRun("retrain", mode, choice)
        fit = None if fitted else auto_fit_config(given.get("batch_size", 8), given.get("seed", 0))
        cache = self.load_curvature(cache_path, train) if fitted else None
        if cache is not None:
            damping = cache.calibration.damping if cache.calibration else defaults.damping
        else:
            assert fit is not None
            damping = fit.calibration_damping if fit.calibration_examples > 0 else defaults.damping
        config = self.erase_config(**{**given, "damping": damping, "curvature_use": "direct",
                                      "trust_region": given.get("trust_region", True),
                                      "trust_region_steps": steps})
        return EraseRun("update", mode, choice, config, cache_path, fit, cache=cache)

    def estimate_plan(self, plan: EraseRun, train: Sequence[Example], requests: Sequence[Any], *,
                      heldout: Sequence[Example] | None = None) -> RunEstimate:
        """The dry run of ``plan``: each stage ``run_plan`` would run, estimated from timed probe steps on this
        data (``llmeraser.estimate``); nothing is trained, fitted or written."""
        from llmeraser.estimate import estimate_erase, estimate_fit_curvature, estimate_train

        if plan.mode == "retrain":
            from llmeraser.adapter import attach_lora
            from llmeraser.requests import edited_training_set, resolve

            edited = edited_training_set(train, resolve(requests, train))
            estimate = estimate_train(attach_lora(self.base, self.record.lora), self.tokenizer, edited, self.recipe,
                                      schedule=self.retrain_schedule(train, edited))
            estimate.command = "erase (paired retrain)"
            return estimate
        recipe, layers, calibration, stages = self.recipe, None, None, []
        if plan.fit is not None:
            fit = plan.fit
            fitted = estimate_fit_curvature(
                self.model, self.tokenizer, train, fit.method, batch_size=fit.batch_size, seed=fit.seed,
                max_length=recipe.max_length, loss_scope=recipe.loss_scope, curvature_examples=fit.curvature_examples,
                damping=fit.datainf_damping, calibration_examples=fit.calibration_examples,
                calibration_directions=fit.calibration_directions, calibration_damping=fit.calibration_damping,
                weight_decay=recipe.weight_decay)
            stages = [replace(stage, name=f"fit: {stage.name}") for stage in fitted.stages]
            layers = fitted.layers
            if fit.calibration_examples > 0:
                calibration = StepCalibration.planned(fit.calibration_damping, recipe.weight_decay,
                                                      fit.calibration_examples, fit.calibration_directions, fit.seed)
        elif plan.cache is not None:
            layers, calibration = plan.cache.layers, plan.cache.calibration
        estimate = estimate_erase(self.model, self.tokenizer, train, requests, plan.config, curvature_cache=layers,
                                  calibration=calibration, heldout=heldout)
        if plan.fit is not None:  # timed with the probe's stand-in layers (same sizes): named as the fit's method
            estimate.stages = [replace(stage, name=f"solve ({plan.fit.method})") if stage.name.startswith("solve (")
                               else stage for stage in estimate.stages]
        estimate.stages[:0] = stages
        return estimate

    def run_plan(self, plan: EraseRun, train: Sequence[Example], requests: Sequence[Any], *,
                 heldout: Sequence[Example] | None = None, progress: bool = True,
                 requests_sha256: str | None = None) -> ErasedAdapter:
        """Run ``plan`` (``plan_erase``): the paired retrain, or the update (fitting its curvature first when
        the plan says so). The report records the plan."""
        if plan.mode == "retrain":
            erased = self.retrain(train, requests, progress=progress, requests_sha256=requests_sha256)
        else:
            cache = plan.cache
            if plan.fit is not None:
                assert plan.cache_path is not None
                if progress:
                    print(f"fitting the {plan.fit.method} curvature once for this adapter and data (kept in "
                          f"{plan.cache_path})")
                self.fit_curvature(train, plan.cache_path, plan.fit)
                wait_for_rank_zero()
                cache = self.load_curvature(plan.cache_path, train)
            erased = self.erase(train, requests, plan.config, cache, heldout=heldout, progress=progress,
                                requests_sha256=requests_sha256)
        erased.report.update({"plan": plan.to_json()})
        return erased

    def retrain(self, train: Sequence[Example], requests: Sequence[Any], *, progress: bool = True,
                requests_sha256: str | None = None) -> ErasedAdapter:
        """Erase by a paired retrain (exact by construction): a fresh LoRA with the recorded settings and seed,
        trained with the recorded recipe on the original run's batches with the edits applied in place. Needs
        a recipe ``llmeraser train`` ran (``record.reproducible``)."""
        from llmeraser.adapter import attach_lora
        from llmeraser.eraser import library_versions, peak_memory_mb
        from llmeraser.requests import affected_examples, count_by_kind, duplicates_report, edited_training_set, resolve
        from llmeraser.train import train_adapter

        if not self.record.reproducible:
            raise InputError(f"a paired retrain needs the recipe llmeraser train ran; this adapter's record is "
                             f"{self.record.origin!r}", self.path)
        started = time.perf_counter()
        data_hash = self._ensure_checked(train, requests)
        pairs = resolve(requests, train)
        edited = edited_training_set(train, pairs)
        recipe = self.recipe
        model = attach_lora(self.base, self.record.lora)
        schedule = self.retrain_schedule(train, edited)
        result = train_adapter(model, self.tokenizer, edited, recipe, progress=progress, schedule=schedule)
        if result.losses and not math.isfinite(result.losses[-1]):
            raise NumericalError(f"the retraining objective is {result.losses[-1]}", stage="train")
        report = ErasureReport({
            "method": "retrain",
            "requests": count_by_kind([p.request for p in pairs]),
            "affected_examples": affected_examples(pairs),  # by the requests' ids (the lineage keeps the hashes)
            "duplicates_remaining": duplicates_report(train, pairs),
            "n_train": len(train),
            "solver": {"solver": "retrain", "status": "paired retrain with the recorded recipe (exact by construction)",
                       "converged": True, "iterations": result.steps, "final_relative_residual": 0.0},
            "config": {"recipe": recipe.to_json(), "lora": self.record.to_json()["lora"], "paired": schedule is not None},
            "timings_s": {"retrain_s": result.wall_time_s, "total_s": time.perf_counter() - started},
            "peak_memory_mb": peak_memory_mb(),
            "versions": library_versions(),
            "final_objective": result.losses[-1] if result.losses else None,
            **self._report_fields(requests, requests_sha256, None),
        })
        return ErasedAdapter(self, model, None, report, data_hash, edited)

    def retrain_schedule(self, train: Sequence[Example], edited: Sequence[Example]) -> Schedule | None:
        """The paired retrain's mini-batches (``train.paired_schedule``; None for L-BFGS, which is full-batch)."""
        from llmeraser.train import paired_schedule

        if self.recipe.optimizer != "adam":
            return None
        return paired_schedule([e.id for e in train], [e.id for e in edited], self.recipe)

    def _report_fields(self, requests: Sequence[Any], requests_sha256: str | None,
                       heldout: Sequence[Example] | None) -> dict[str, Any]:
        from llmeraser.lineage import canonical_json

        if requests_sha256 is None:
            text = canonical_json([r.to_json() for r in requests])
            requests_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return {
            "input_adapter_sha256": self.input_sha256,
            "requests_file_sha256": requests_sha256,
            "training_data_sha256": self.record.data_sha256 if self.recorded else None,
            "training_record": "recorded" if self.recorded else "assumed (no llmeraser training record)",
            "recipe_used": {name: getattr(self.recipe, name) for name in RECIPE_FIELDS},
            "heldout_data_sha256": dataset_hash(heldout) if heldout else None,
            "mismatches_allowed": list(self.problems),
        }

