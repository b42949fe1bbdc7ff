"""Content hashes and the training record that ties an adapter to its base model, data and recipe.

``llmeraser train`` writes ``llmeraser_training.json`` beside the adapter weights: the recipe, the LoRA
settings, the base model's name and fingerprint, and the content hash of the training data. Later
commands check that they are given the matching pieces, and ``retrain`` reuses the recipe.

Hashes are SHA-256 hex digests (``llmeraser.hashing``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser.hashing import dataset_hash
from llmeraser.model import FINGERPRINT_ATTRIBUTE, LoraSettings
from llmeraser.train import TrainConfig

TRAINING_RECORD = "llmeraser_training.json"
ORIGIN_TRAIN = "llmeraser train"
ORIGIN_ASSUMED = "assumed by erase (an adapter trained outside llmeraser)"
ORIGIN_CALLBACK = "llmeraser.integrations.LlmeraserCallback"


FINGERPRINT_SCHEME = "llmeraser-fingerprint-2"
EMBEDDINGS_PART = "input_embeddings"


def _canonical(name: str) -> str:
    """A module's name in the bare base model: without PEFT's ``base_model.model.`` prefix and ``.base_layer``."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def _targeted(name: str, target_modules: str | Sequence[str]) -> str | None:
    """The target a module name matches as PEFT matches it (a regex string: full match; a list: the name
    or its last components), or None."""
    if isinstance(target_modules, str):
        return name.rsplit(".", 1)[-1] if re.fullmatch(target_modules, name) else None
    return next((t for t in target_modules if name == t or name.endswith("." + t)), None)


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's values as float32 (exact for float32 and the half-precision formats)."""
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


def fingerprint_parts(base: Any, target_modules: str | Sequence[str] = ()) -> dict[str, str]:
    """Per part of a base model, a SHA-256 over the names, shapes and stored values of its weights: the input
    embeddings (``input_embeddings``) and, per LoRA target (``q_proj``, ...), the weights of the modules it
    adapts. Config keys are not hashed (``save_pretrained`` rewrites ``architectures``, ``dtype``, ...).
    ``base`` may already carry PEFT layers (their base weights are hashed). A model ``load_base_model``
    cast from its stored precision hashes the values as stored (``FINGERPRINT_ATTRIBUTE``)."""
    stored = getattr(base, FINGERPRINT_ATTRIBUTE, None) or {}
    embeddings = base.get_input_embeddings()
    embeddings = getattr(embeddings, "base_layer", embeddings)
    groups: dict[str, list[str]] = {}
    for name, module in base.named_modules():
        clean = _canonical(name)
        wanted = [EMBEDDINGS_PART] if module is embeddings else []
        if "lora_" not in clean and not name.endswith("base_layer"):
            wanted += [t for t in [_targeted(clean, target_modules)] if t is not None]
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if not wanted or not isinstance(weight, torch.Tensor):
            continue
        key = f"{clean}.weight"
        line = f"{key}:{list(weight.shape)}:{stored.get(key) or tensor_digest(weight)}"
        for group in wanted:
            groups.setdefault(group, []).append(line)
    return {group: hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()
            for group, lines in sorted(groups.items())}


def stored_digests(base: Any) -> dict[str, str]:
    """``{parameter name: tensor_digest}`` of every weight as it is now (``load_base_model`` keeps this
    before casting a model to another precision)."""
    return {name: tensor_digest(tensor) for name, tensor in base.named_parameters()}


def combine_parts(parts: dict[str, str]) -> str:
    """The fingerprint of a set of parts (``fingerprint_parts``)."""
    body = FINGERPRINT_SCHEME + "\n" + "\n".join(f"{key}={value}" for key, value in sorted(parts.items()))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def model_fingerprint(base: Any, target_modules: str | Sequence[str] = ()) -> str:
    """Hash of the base-model weights that matter to an adapter: the input embeddings and the weights of
    the modules it targets (``fingerprint_parts``), as stored.

    Identifies the base model whatever name it was loaded by and however it was re-saved; a different
    checkpoint (another seed, another fine-tune) gets a different fingerprint.
    """
    return combine_parts(fingerprint_parts(base, target_modules))


def fingerprint_differences(recorded: dict[str, str] | None, given: dict[str, str]) -> str:
    """What differs between two ``fingerprint_parts``, in words."""
    if not recorded:
        return "the record names no parts (written by an older llmeraser): re-train, or pass --allow-mismatch"
    label = lambda part: "the input embeddings" if part == EMBEDDINGS_PART else f"the {part} weights"  # noqa: E731
    differ = [label(p) for p in sorted(set(recorded) | set(given)) if recorded.get(p) != given.get(p)]
    same = [label(p) for p in sorted(recorded) if recorded.get(p) == given.get(p)]
    return f"they differ in {', '.join(differ)}" + (f" (the same: {', '.join(same)})" if same else "")


@dataclass(frozen=True)
class TrainingRecord:
    """What an adapter was trained from: base model (name and fingerprint), data hash and size, recipe."""

    model: str
    model_fingerprint: str
    data_sha256: str
    n_examples: int
    recipe: TrainConfig
    lora: LoraSettings
    model_fingerprint_parts: dict[str, str] | None = None
    origin: str = ORIGIN_TRAIN
    chat_template_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lora": {**asdict(self.lora), "target_modules": list(self.lora.target_modules)}}

    @property
    def reproducible(self) -> bool:
        """Whether ``llmeraser train`` ran the recipe (so a paired retrain reproduces the run)."""
        return self.origin == ORIGIN_TRAIN

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainingRecord:
        lora = obj["lora"]
        return cls(
            obj["model"],
            obj["model_fingerprint"],
            obj["data_sha256"],
            obj["n_examples"],
            TrainConfig(**obj["recipe"]),
            LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])}),
            obj.get("model_fingerprint_parts"),
            obj.get("origin", ORIGIN_TRAIN),
            obj.get("chat_template_sha256"),
        )


def read_training_record(adapter_dir: str | Path) -> TrainingRecord | None:
    """The adapter's training record, or None for an adapter not trained by llmeraser."""
    path = Path(adapter_dir) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        return TrainingRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"unreadable training record ({err})", path) from None


def check_matches(
    record: TrainingRecord | None,
    adapter_dir: str | Path,
    base: Any,
    train: Sequence[Example],
    data_path: str | Path,
    allow_mismatch: bool = False,
    parts: dict[str, str] | None = None,
) -> list[str]:
    """Compare the given base model and training data with the adapter's record.

    Returns the list of mismatches (empty when all match or there is no record); raises ``InputError``
    on a mismatch unless ``allow_mismatch``. ``parts``: the base model's ``fingerprint_parts`` over the
    record's target modules, when already computed.
    """
    if record is None:
        return []
    problems = []
    parts = parts if parts is not None else fingerprint_parts(base, record.lora.target_modules)
    if combine_parts(parts) != record.model_fingerprint:
        problems.append(f"the base model is not the one the adapter was trained on (recorded: '{record.model}'; "
                        f"{fingerprint_differences(record.model_fingerprint_parts, parts)})")
    if dataset_hash(train) != record.data_sha256:
        problems.append(
            f"{data_path} is not the data the adapter was trained on (recorded: {record.n_examples} examples, "
            f"sha256 {record.data_sha256[:12]}…; given: {len(train)} examples, sha256 {dataset_hash(train)[:12]}…)"
        )
    if problems and not allow_mismatch:
        raise InputError("; ".join(problems) + " (pass --allow-mismatch to proceed knowingly)", adapter_dir)
    return problems
