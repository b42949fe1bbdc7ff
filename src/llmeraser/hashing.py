"""SHA-256 content hashes (hex digests) of files, examples, data sets and adapter directories.

An example's hash covers its id and content (canonical JSON of ``Example.to_json``: prompt and response,
or a conversation's messages, roles and contents in order, and its layout), so reports can name affected
examples without containing their text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

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
