"""Content hashes and the training record that ties an adapter to its base model, data and recipe.

``llmeraser train`` writes ``llmeraser_training.json`` beside the adapter weights: the recipe, the LoRA
settings, the base model's name and fingerprint, and the content hash of the training data. Later
commands check that they are given the matching pieces, and ``retrain`` reuses the recipe.

Hashes are SHA-256 hex digests (``llmeraser.hashing``).
"""

from __future__ import annotations

import hashlib
import json
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


def model_fingerprint(base: Any) -> str:
    """Hash of a base model's architecture config and its input-embedding weights.

    Identifies the base model whatever name it was loaded by; a different checkpoint of the same
    architecture (another seed, another fine-tune) gets a different fingerprint. A model that
    ``load_base_model`` cast to another dtype (bfloat16) carries the fingerprint of its weights as stored.
    """
    stamped = getattr(base, FINGERPRINT_ATTRIBUTE, None)
    if stamped is not None:
        return stamped
    config = base.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    embedding = base.get_input_embeddings().weight.detach().to(torch.float32).contiguous()
    digest.update(embedding.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingRecord:
    """What an adapter was trained from: base model (name and fingerprint), data hash and size, recipe."""

    model: str
    model_fingerprint: str
    data_sha256: str
    n_examples: int
    recipe: TrainConfig
    lora: LoraSettings

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lora": {**asdict(self.lora), "target_modules": list(self.lora.target_modules)}}

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
        )


def read_training_record(adapter_dir: str | Path) -> TrainingRecord | None:
    """The adapter's training record, or None for an adapter not trained by llmeraser."""
    path = Path(adapter_dir) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        return TrainingRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"unreadable training record ({err})", path) from None


def check_matches(
    record: TrainingRecord | None,
    adapter_dir: str | Path,
    base: Any,
    train: Sequence[Example],
    data_path: str | Path,
    allow_mismatch: bool = False,
) -> list[str]:
    """Compare the given base model and training data with the adapter's record.

    Returns the list of mismatches (empty when all match or there is no record); raises ``InputError``
    on a mismatch unless ``allow_mismatch``.
    """
    if record is None:
        return []
    problems = []
    if model_fingerprint(base) != record.model_fingerprint:
        problems.append(f"the base model is not the one the adapter was trained on (recorded: '{record.model}')")
    if dataset_hash(train) != record.data_sha256:
        problems.append(
            f"{data_path} is not the data the adapter was trained on (recorded: {record.n_examples} examples, "
            f"sha256 {record.data_sha256[:12]}…; given: {len(train)} examples, sha256 {dataset_hash(train)[:12]}…)"
        )
    if problems and not allow_mismatch:
        raise InputError("; ".join(problems) + " (pass --allow-mismatch to proceed knowingly)", adapter_dir)
    return problems
