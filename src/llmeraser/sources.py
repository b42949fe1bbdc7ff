"""Rows of a data file, by format: JSONL, JSON, CSV/TSV, Parquet (chosen by the file extension).

Each reader yields ``(row, line, obj)``: ``row`` the 0-based index among the data rows, ``line`` the
1-based line of the file where the row starts (JSONL, CSV) or None (JSON, Parquet), ``obj`` the row as a
dict. Errors are ``InputError`` naming the file and the line (``path:line: …``) or the row
(``path: row n: …``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmeraser.errors import InputError
from llmeraser.jsonl import _DuplicateKey, _unique_keys, iter_jsonl

Row = tuple[int, "int | None", dict[str, Any]]

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}
"""File extension → format; any other extension is read as JSONL."""

JSON_LIST_KEYS = ("data", "rows", "examples")
"""A JSON file is a list of row objects, or an object holding that list under one of these keys."""


def data_format(path: str | Path) -> str:
    """The format a data file is read as, from its extension (case-insensitive; default ``jsonl``)."""
    return FORMATS.get(Path(path).suffix.lower(), "jsonl")


def _check_file(path: Path, kind: str) -> None:
    if path.is_dir():
        raise InputError(f"is a directory, expected a {kind} file", path)
    if not path.is_file():
        raise InputError("file not found", path)


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Rows of the data file ``path`` in its format (see ``data_format``)."""
    kind = data_format(path)
    if kind == "jsonl":
        return (((row, line, obj) for row, (line, obj) in enumerate(iter_jsonl(path))))
    return {"json": iter_json_rows, "csv": iter_csv_rows, "tsv": iter_csv_rows, "parquet": iter_parquet_rows}[kind](path)


def iter_json_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a JSON file: a list of objects, or ``{"data" | "rows" | "examples": [objects]}``."""
    path = Path(path)
    _check_file(path, "JSON")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"not valid UTF-8 (byte {err.start})", path) from None
    except OSError as err:
        raise InputError(f"cannot read file: {err.strerror}", path) from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg}", path, err.lineno) from None
    except _DuplicateKey as err:
        raise InputError(f"duplicate key '{err.args[0]}' in one object (ambiguous)", path) from None
    except (RecursionError, ValueError) as err:
        raise InputError(f"malformed JSON: {err}", path) from None
    if isinstance(value, dict):
        keys = [key for key in JSON_LIST_KEYS if isinstance(value.get(key), list)]
        if len(keys) != 1:
            raise InputError(
                f"expected a JSON list of rows, or an object with one list under {' / '.join(JSON_LIST_KEYS)}", path
            )
        value = value[keys[0]]
    if not isinstance(value, list):
        raise InputError(f"expected a JSON list of rows, got {type(value).__name__}", path)
    for row, obj in enumerate(value):
        if not isinstance(obj, dict):
            raise InputError(f"row {row}: expected a JSON object, got {type(obj).__name__}", path)
        yield row, None, obj


def iter_csv_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a CSV file (a ``.tsv``: tab-separated) with a header row; every field is a string.

    Lines are counted from 1 (the header); a row that spans lines (a quoted newline) is named by its first.
    Blank lines are skipped. A row with more or fewer fields than the header is an error.
    """
    path = Path(path)
    _check_file(path, "CSV")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        handle = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 (entered below, as in jsonl.py)
    except OSError as err:
        raise InputError(f"cannot read file: {err.strerror}", path) from None
    with handle:
        reader = csv.reader(handle, delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                raise InputError("no header row", path)
            for name in header:
                if header.count(name) > 1:
                    raise InputError(f"column '{name}' appears twice in the header", path, 1)
            row = 0
            line = reader.line_num + 1
            for record in reader:
                start, line = line, reader.line_num + 1
                if not record:
                    continue
                if len(record) != len(header):
                    raise InputError(
                        f"expected {len(header)} fields (as the header: {', '.join(header)}), got {len(record)}",
                        path,
                        start,
                    )
                yield row, start, dict(zip(header, record))
                row += 1
        except UnicodeDecodeError as err:
            raise InputError(f"not valid UTF-8 (byte {err.start} of a read block)", path, line) from None
        except csv.Error as err:
            raise InputError(f"malformed CSV: {err}", path, line) from None


def iter_parquet_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a Parquet file (pyarrow), nested columns (lists of messages) as Python lists of dicts."""
    path = Path(path)
    _check_file(path, "Parquet")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise InputError(f"cannot read as Parquet: {err}", path) from None
    for row, obj in enumerate(table.to_pylist()):
        yield row, None, obj

