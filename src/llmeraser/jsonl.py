"""Line-by-line JSONL reading with errors that name the file and line, and JSONL writing (atomic)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmeraser.atomic import atomic_file
from llmeraser.errors import InputError


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key given twice (``json`` would silently keep the last)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line (1-based numbers).

    Streams the file; accepts a UTF-8 BOM and CRLF line ends. Raises ``InputError`` naming the file
    and line for undecodable bytes, malformed JSON, or a line that is not a JSON object.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory, expected a JSONL file", path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (entered below: an open error is reported apart from a read error)
    except OSError as err:
        raise InputError(f"cannot read file: {err.strerror}", path) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"not valid UTF-8 (byte {err.start})", path, number) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"), object_pairs_hook=_unique_keys)  # columns within the line
            except json.JSONDecodeError as err:
                raise InputError(f"malformed JSON: {err.msg} (column {err.colno})", path, number) from None
            except _DuplicateKey as err:
                raise InputError(f"duplicate key '{err.args[0]}' in one object (ambiguous)", path, number) from None
            except RecursionError:
                raise InputError("malformed JSON: nested too deeply", path, number) from None
            except ValueError as err:  # e.g. an integer beyond Python's digit limit
                raise InputError(f"malformed JSON: {err}", path, number) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, number)
            yield number, obj


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (``llmeraser.atomic.atomic_file``)."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def require_str(obj: dict[str, Any], key: str, path: str | Path, line: int | None, allow_int: bool = False) -> str:
    """Return ``obj[key]`` as a string, or raise ``InputError`` naming file, line and field."""
    if key not in obj:
        raise InputError(f"missing field '{key}'", path, line)
    value = obj[key]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InputError(f"field '{key}' must be a string, got {type(value).__name__}", path, line)
    if not value.strip():
        raise InputError(f"field '{key}' is empty", path, line)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # "\ud800" is valid JSON but not text
        raise InputError(f"field '{key}' contains an unpaired surrogate escape (character {err.start})", path, line) from None
    return value
