"""Content hashes and the training record that ties an adapter to its base model, data and recipe.

``llmeraser train`` writes ``llmeraser_training.json`` beside the adapter weights: the recipe, the LoRA
settings, the base model's name and fingerprint, and the content hash of the training data. Later
commands check that they are given the matching pieces, and ``retrain`` reuses the recipe.

Hashes are SHA-256 hex digests (``llmeraser.hashing``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmeraser.adapter import LoraSettings
from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser.hashing import combine_parts, dataset_hash, fingerprint_differences, fingerprint_parts
from llmeraser.train import TrainConfig

TRAINING_RECORD = "llmeraser_training.json"
ORIGIN_TRAIN = "llmeraser train"
ORIGIN_ASSUMED = "assumed by erase (an adapter trained outside llmeraser)"
ORIGIN_CALLBACK = "llmeraser.integrations.LlmeraserCallback"


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
        targets = self.lora.target_modules
        lora = {**asdict(self.lora), "target_modules": targets if isinstance(targets, str) else list(targets)}
        return {**asdict(self), "lora": lora}

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
            LoraSettings(**{**lora, "target_modules": lora["target_modules"] if isinstance(lora["target_modules"], str)
                            else tuple(lora["target_modules"])}),
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
        raise InputError("; ".join(problems) + " (pass `allow_mismatch=True` to proceed knowingly)", adapter_dir)
    return problems
