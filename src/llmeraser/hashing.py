"""SHA-256 content hashes (hex digests) of files, examples, data sets, adapter directories and base models.

An example's hash covers its id and content (canonical JSON of ``Example.to_json``: prompt and response,
or a conversation's messages, roles and contents in order, and its layout), so reports can name affected
examples without containing their text. A base model's fingerprint (``model_fingerprint``) hashes the
weights an adapter depends on, per part, so a mismatch can say which part differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmeraser.data import Example


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def example_hash(example: Example) -> str:
    """Hash of one example's id and content: prompt and response, or a conversation's messages (canonical JSON)."""
    return sha256_bytes(json.dumps(example.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8"))


def dataset_hash(examples: Sequence[Example]) -> str:
    """Hash of a data set's content in order (independent of file layout: key order, line ends, BOM)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example_hash(example).encode("ascii"))
    return digest.hexdigest()


def adapter_hash(adapter_dir: str | Path) -> str:
    """Hash of an adapter directory's weights and config (``adapter_model.safetensors``, ``adapter_config.json``)."""
    adapter_dir = Path(adapter_dir)
    parts = [sha256_file(adapter_dir / name) for name in ("adapter_model.safetensors", "adapter_config.json")]
    return sha256_bytes("".join(parts).encode("ascii"))


FINGERPRINT_ATTRIBUTE = "llmeraser_fingerprint"  # set by load_base_model on a model cast from its stored dtype:
# {parameter name: digest of its stored values} (fingerprint_parts reads it)
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
        return "the record names no parts (written by an older llmeraser): re-train, or pass `allow_mismatch=True`"
    label = lambda part: "the input embeddings" if part == EMBEDDINGS_PART else f"the {part} weights"  # noqa: E731
    differ = [label(p) for p in sorted(set(recorded) | set(given)) if recorded.get(p) != given.get(p)]
    same = [label(p) for p in sorted(recorded) if recorded.get(p) == given.get(p)]
    return f"they differ in {', '.join(differ)}" + (f" (the same: {', '.join(same)})" if same else "")
