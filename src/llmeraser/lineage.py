"""Audit lineage: a hash-chained log, ``lineage.jsonl``, carried inside every adapter llmeraser writes.

``train`` / ``retrain`` start the log with one entry; each ``erase`` copies the input adapter's entries
into the new adapter and appends its own. An entry records when and by which tool version it was
written, the hashes of the input and output adapters, of the training data before and after, of the
request file and of each affected example (never their text), the solver settings and a summary of the
result. Each entry carries ``prev_sha256`` (the previous entry's hash; 64 zeros for the first) and its
own ``entry_sha256`` over its canonical JSON, so that editing, removing, inserting or reordering entries
breaks the chain, and the last entry names the weights it produced (``output_adapter_sha256``).

A hash chain detects accidental and naive changes; someone who rewrites the weights, the whole log and
recomputes every hash is not stopped by it (that needs a signature or a copy of an entry kept elsewhere:
an entry's ``entry_sha256`` is a short value to keep with a deletion ticket).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmeraser.jsonl import iter_jsonl

LINEAGE_FILE = "lineage.jsonl"
GENESIS = "0" * 64
HASH_KEY = "entry_sha256"
PREV_KEY = "prev_sha256"


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("nan", "inf"), so that canonical JSON is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def canonical_json(obj: Any) -> str:
    """Sorted keys, no insignificant whitespace, UTF-8 text, strict JSON (no NaN): stable for hashing."""
    return json.dumps(_json_safe(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_digest(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its own ``entry_sha256`` field."""
    body = {key: value for key, value in entry.items() if key != HASH_KEY}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (``2026-01-31T12:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seal(entry: dict[str, Any], previous: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``entry`` as the next link after ``previous``: with ``index``, ``prev_sha256`` and ``entry_sha256``."""
    body = {key: value for key, value in _json_safe(entry).items() if key not in (HASH_KEY, PREV_KEY, "index")}
    body["index"] = len(previous)
    body[PREV_KEY] = previous[-1][HASH_KEY] if previous else GENESIS
    return {**body, HASH_KEY: entry_digest(body)}


def append_entry(entries: Sequence[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A new list: ``entries`` followed by ``entry`` sealed onto them (the inputs are not modified)."""
    return [*entries, seal(entry, entries)]


def lineage_text(entries: Sequence[dict[str, Any]]) -> str:
    """``lineage.jsonl`` content: one canonical JSON entry per line."""
    return "".join(canonical_json(entry) + "\n" for entry in entries)


def read_lineage(adapter_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``ADAPTER_DIR/lineage.jsonl`` in order; ``[]`` when the adapter has none.

    Malformed lines raise ``InputError`` naming the file and line (a tampered or truncated log).
    """
    path = Path(adapter_dir) / LINEAGE_FILE
    if not path.exists():
        return []
    return [entry for _, entry in iter_jsonl(path)]


def verify_chain(
    entries: Sequence[dict[str, Any]],
    adapter_hash: str | None = None,
    data_sha256: str | None = None,
) -> list[str]:
    """Problems with a lineage, as messages naming the entry; ``[]`` when the chain is intact.

    Checks each entry's own hash, the link to its predecessor, that each entry's input adapter is the
    previous entry's output, and (when given) that the last entry's output is ``adapter_hash`` (the weights
    beside the log) and its training data after the step is ``data_sha256`` (the training record's).
    """
    problems: list[str] = []
    previous_hash, previous_output = GENESIS, None
    for position, entry in enumerate(entries):
        name = f"entry #{position} (line {position + 1})"
        recorded = entry.get(HASH_KEY)
        if not isinstance(recorded, str):
            problems.append(f"{name}: no {HASH_KEY}")
        elif entry_digest(entry) != recorded:
            problems.append(f"{name}: its content does not match its {HASH_KEY} (edited after it was written)")
        if entry.get("index") != position:
            problems.append(f"{name}: records index {entry.get('index')!r} (entries removed, inserted or reordered)")
        if entry.get(PREV_KEY) != previous_hash:
            what = "does not start the chain" if position == 0 else f"does not link to entry #{position - 1}"
            problems.append(f"{name}: {PREV_KEY} {what} (entries removed, inserted, reordered or edited)")
        given_input = entry.get("input_adapter_sha256")
        if previous_output is not None and given_input is not None and given_input != previous_output:
            problems.append(f"{name}: its input adapter is not the output of entry #{position - 1}")
        previous_hash = recorded if isinstance(recorded, str) else entry_digest(entry)
        previous_output = entry.get("output_adapter_sha256")
    if entries and adapter_hash is not None and previous_output != adapter_hash:
        problems.append(
            f"entry #{len(entries) - 1}: the adapter's weights are not the ones this entry wrote "
            "(adapter_model.safetensors or adapter_config.json changed afterwards)"
        )
    if entries and data_sha256 is not None and entries[-1].get("data_after_sha256") not in (None, data_sha256):
        problems.append(f"entry #{len(entries) - 1}: the training record's data hash is not the one this entry wrote")
    return problems


def verify_adapter(adapter_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, problems) for an adapter directory: the chain checked against its weights and record."""
    from llmeraser.hashing import adapter_hash
    from llmeraser.provenance import read_training_record

    entries = read_lineage(adapter_dir)
    record = read_training_record(adapter_dir)
    return entries, verify_chain(entries, adapter_hash(adapter_dir), record.data_sha256 if record else None)


def train_entry(
    command: str,
    model: str,
    model_fingerprint: str,
    data_sha256: str,
    n_examples: int,
    recipe: dict[str, Any],
    lora: dict[str, Any],
    output_adapter_sha256: str,
    summary: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The entry that starts a lineage: an adapter trained from scratch (``train`` or ``retrain``)."""
    from llmeraser import __version__

    return {
        "command": command,
        "time": utc_now(),
        "tool": "llmeraser",
        "tool_version": __version__,
        "model": model,
        "model_fingerprint": model_fingerprint,
        "data_after_sha256": data_sha256,
        "n_examples_after": n_examples,
        "recipe": recipe,
        "lora": lora,
        "input_adapter_sha256": None,
        "output_adapter_sha256": output_adapter_sha256,
        "result": summary,
        **(extra or {}),
    }


def _hashes_only(affected: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The report's ``affected_examples`` without the requests' ids: the lineage, which travels with the
    adapter, names edited examples by the hashes of their versions only."""
    return None if affected is None else [{k: v for k, v in a.items() if k != "id"} for a in affected]


def erase_entry(
    report: dict[str, Any],
    output_adapter_sha256: str,
    data_before_sha256: str,
    data_after_sha256: str,
    n_examples_after: int,
) -> dict[str, Any]:
    """The entry of one ``erase``, from its ``erasure_report.json`` content (hashes and numbers only)
    and the hashes of the training data before and after the edit."""
    from llmeraser import __version__

    solver = report.get("solver", {})
    return {
        "command": "erase",
        "time": utc_now(),
        "tool": "llmeraser",
        "tool_version": __version__,
        "requests_file_sha256": report.get("requests_file_sha256"),
        "requests": report.get("requests"),
        "affected_examples": _hashes_only(report.get("affected_examples")),
        "input_adapter_sha256": report.get("input_adapter_sha256"),
        "output_adapter_sha256": output_adapter_sha256,
        "data_before_sha256": data_before_sha256,
        "n_examples_before": report.get("n_train"),
        "data_after_sha256": data_after_sha256,
        "n_examples_after": n_examples_after,
        "method": report.get("method", "update"),
        "plan": report.get("plan"),
        "solver_settings": report.get("config"),
        "result": {
            "solver": solver.get("solver"),
            "status": solver.get("status"),
            "converged": solver.get("converged"),
            "iterations": solver.get("iterations"),
            "final_relative_residual": solver.get("final_relative_residual"),
            "damping_used": report.get("damping_used"),
            "damping_attempts": report.get("damping_attempts"),
            "b_norm": report.get("b_norm"),
            "update_norm": report.get("update_norm"),
            "trust_region": _trust_region_summary(report.get("trust_region")),
        },
        "mismatches_allowed": report.get("mismatches_allowed") or [],
    }


def _trust_region_summary(region: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lineage's record of a trust-region erase: steps, step sizes, why it stopped, the checks."""
    if not region:
        return None
    return {"steps": [s["scale"] for s in region["steps"] if s["accepted"]], "stopped": region["stopped"],
            "acceptance": region["acceptance"]}


def _short(value: Any) -> str:
    return str(value or "-")[:12]


def describe(entry: dict[str, Any]) -> str:
    """Three lines about an entry for ``llmeraser history``: what, which data / requests, which adapters."""
    get = entry.get
    head = f"#{get('index')}  {get('time', '?')}  {get('command', '?'):<7}  {get('tool', '?')} {get('tool_version', '?')}"
    result = get("result") or {}
    if get("command") == "erase":
        kinds = ", ".join(f"{op} {n}" for op, n in (get("requests") or {}).items() if n)
        damping, residual = result.get("damping_used"), result.get("final_relative_residual")
        damping_text = f", λ={damping:g}" if isinstance(damping, (int, float)) else ""
        residual_text = f"{residual:.2e}" if isinstance(residual, (int, float)) else str(residual)
        body = (
            f"requests {_short(get('requests_file_sha256'))} ({kinds}); examples {get('n_examples_before')} → "
            f"{get('n_examples_after')}; {result.get('solver')}: {result.get('status')}, "
            f"residual {residual_text}{damping_text}"
        )
    else:
        body = f"model {get('model')}; data {_short(get('data_after_sha256'))} ({get('n_examples_after')} examples)"
    adapters = f"adapter {_short(get('input_adapter_sha256'))} → {_short(get('output_adapter_sha256'))}"
    return f"{head}\n    {body}\n    {adapters}; entry {_short(get(HASH_KEY))}"
