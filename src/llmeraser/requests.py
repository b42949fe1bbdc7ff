"""Unlearning requests: what to remove, re-prompt or correct, and how they edit the training set.

Request file (JSONL, one request a line, ops may be mixed, one op per id)::

    {"op": "remove", "id": "u17-3"}
    {"op": "modify_query", "id": "u21-0", "prompt": "<the corrected prompt>"}
    {"op": "correct_response", "id": "u30-2", "response": "<the corrected response>"}

For a conversation (``llmeraser.data.Example.messages``), ``correct_response`` replaces the content of
the last assistant turn and ``modify_query`` that of the last user turn before it; an optional integer
``turn`` (0-based index into the messages; for TRL's prompt/completion layout, into prompt + completion)
addresses another turn: an assistant turn for ``correct_response``, a non-assistant one for ``modify_query``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser.hashing import example_hash
from llmeraser.jsonl import iter_jsonl, require_str, write_jsonl


@dataclass(frozen=True)
class Source:
    """Where a request came from (file and 1-based line), for error messages."""

    path: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class Remove:
    """Delete the training example ``id`` (instance removal)."""

    id: str
    source: Source = field(default=Source(), compare=False)
    op = "remove"

    def apply(self, example: Example) -> Example | None:
        return None

    def to_json(self) -> dict[str, str]:
        return {"op": self.op, "id": self.id}


@dataclass(frozen=True)
class ModifyQuery:
    """Replace the prompt of training example ``id`` (query modification); for a conversation, the content
    of message ``turn`` (default: the last user turn before the last assistant turn)."""

    id: str
    prompt: str
    source: Source = field(default=Source(), compare=False)
    turn: int | None = None
    op = "modify_query"

    def apply(self, example: Example) -> Example:
        try:
            return example.with_prompt(self.prompt, self.turn)
        except InputError as err:
            raise InputError(err.message, self.source.path, self.source.line) from None

    def to_json(self) -> dict[str, Any]:
        turn = {} if self.turn is None else {"turn": self.turn}
        return {"op": self.op, "id": self.id, "prompt": self.prompt, **turn}


@dataclass(frozen=True)
class CorrectResponse:
    """Replace the response of training example ``id`` (response correction); for a conversation, the
    content of message ``turn`` (default: the last assistant turn)."""

    id: str
    response: str
    source: Source = field(default=Source(), compare=False)
    turn: int | None = None
    op = "correct_response"

    def apply(self, example: Example) -> Example:
        try:
            return example.with_response(self.response, self.turn)
        except InputError as err:
            raise InputError(err.message, self.source.path, self.source.line) from None

    def to_json(self) -> dict[str, Any]:
        turn = {} if self.turn is None else {"turn": self.turn}
        return {"op": self.op, "id": self.id, "response": self.response, **turn}


Request = Remove | ModifyQuery | CorrectResponse
REQUEST_KINDS: dict[str, type] = {"remove": Remove, "modify_query": ModifyQuery, "correct_response": CorrectResponse}


@dataclass(frozen=True)
class EditPair:
    """An aligned (old, new) pair: ``old`` is the version in the training set, ``new`` its replacement
    (``None`` for a removal). Both share the id; only the edited field differs."""

    request: Request
    old: Example
    new: Example | None


def request_from_json(obj: dict[str, Any], path: str | Path | None = None, line: int | None = None) -> Request:
    """Parse one request object; errors name the file, the line and the problem."""
    if "op" not in obj:
        raise InputError("missing field 'op'", path, line)
    op = obj["op"]
    if not isinstance(op, str) or op not in REQUEST_KINDS:  # a list or object op is unhashable
        raise InputError(f"unknown op {op!r} (expected one of: {', '.join(REQUEST_KINDS)})", path, line)
    source = Source(str(path) if path is not None else None, line)
    request_id = require_str(obj, "id", path or "<requests>", line or 0, allow_int=True)
    allowed = {"op", "id"} | (
        {"prompt", "turn"} if op == "modify_query" else {"response", "turn"} if op == "correct_response" else set()
    )
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InputError(f"unexpected field(s) for op '{op}': {', '.join(unknown)}", path, line)
    if op == "remove":
        return Remove(request_id, source)
    turn = obj.get("turn")
    if turn is not None and (not isinstance(turn, int) or isinstance(turn, bool) or turn < 0):
        raise InputError(f"field 'turn' must be a non-negative integer (a message index), got {turn!r}", path, line)
    if op == "modify_query":
        return ModifyQuery(request_id, require_str(obj, "prompt", path or "<requests>", line or 0), source, turn)
    return CorrectResponse(request_id, require_str(obj, "response", path or "<requests>", line or 0), source, turn)


def read_requests(path: str | Path) -> list[Request]:
    """Read a request file (JSONL). Rejects bad JSON, unknown ops, missing fields, duplicate ids, empty files."""
    requests: list[Request] = []
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        request = request_from_json(obj, path, line)
        if request.id in first_line:
            raise InputError(
                f"duplicate id '{request.id}' (already requested on line {first_line[request.id]}); one op per id",
                path,
                line,
            )
        first_line[request.id] = line
        requests.append(request)
    if not requests:
        raise InputError("no requests in file", path)
    return requests


def write_requests(path: str | Path, requests: Sequence[Request]) -> None:
    """Write requests as JSONL (atomically)."""
    write_jsonl(path, (r.to_json() for r in requests))


def _where(request: Request) -> tuple[str | None, int | None]:
    return request.source.path, request.source.line


def resolve(requests: Sequence[Request], train: Sequence[Example]) -> list[EditPair]:
    """Pair each request with the training example it edits; raise on unknown or duplicate ids."""
    by_id = {example.id: example for example in train}
    seen: set[str] = set()
    pairs: list[EditPair] = []
    for request in requests:
        path, line = _where(request)
        if request.id not in by_id:
            raise InputError(f"id '{request.id}' is not in the training data", path, line)
        if request.id in seen:
            raise InputError(f"duplicate id '{request.id}'; one op per id", path, line)
        seen.add(request.id)
        old = by_id[request.id]
        pairs.append(EditPair(request, old, request.apply(old)))
    if not pairs:
        raise InputError("no requests given")
    if sum(pair.new is None for pair in pairs) >= len(train):
        raise InputError(
            f"the requests would remove every training example ({len(train)} of {len(train)}); "
            "nothing would be left to train on: retrain or discard the adapter instead",
            pairs[0].request.source.path,
        )
    return pairs


def edited_training_set(train: Sequence[Example], pairs: Sequence[EditPair]) -> list[Example]:
    """The training set after the edits, in the original order: removed ids dropped, edits substituted."""
    replacement = {pair.old.id: pair.new for pair in pairs}
    edited: list[Example] = []
    for example in train:
        if example.id not in replacement:
            edited.append(example)
        elif replacement[example.id] is not None:
            edited.append(replacement[example.id])  # type: ignore[arg-type]
    return edited


def count_by_kind(requests: Sequence[Request]) -> dict[str, int]:
    """``{"remove": k1, "modify_query": k2, "correct_response": k3}``."""
    counts = Counter(request.op for request in requests)
    return {op: counts.get(op, 0) for op in REQUEST_KINDS}


def affected_examples(pairs: Sequence[EditPair]) -> list[dict[str, Any]]:
    """The report's record of each edited example: the request's ``id`` and ``op``, and the hashes of the
    old and new versions (the lineage keeps the hashes only; see ``llmeraser.lineage.erase_entry``)."""
    return [{"id": p.request.id, "op": p.request.op, "old_sha256": example_hash(p.old),
             "new_sha256": example_hash(p.new) if p.new is not None else None} for p in pairs]


def describe_edits(pairs: Sequence[EditPair], limit: int = 10) -> str:
    """One console line naming the edited examples by the requests' ids, per op: ``remove ex3, ex7;
    correct_response ex6`` (at most ``limit`` ids per op, then how many more)."""
    parts = []
    for op in REQUEST_KINDS:
        ids = [p.request.id for p in pairs if p.request.op == op]
        if ids:
            more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
            parts.append(f"{op} {', '.join(ids[:limit])}{more}")
    return "; ".join(parts)


def _content(example: Example) -> str:
    """An example's content without its id (prompt and response, or its messages) as canonical JSON."""
    return json.dumps({k: v for k, v in example.to_json().items() if k != "id"}, sort_keys=True, ensure_ascii=False)


def remaining_duplicates(train: Sequence[Example], pairs: Sequence[EditPair]) -> list[dict[str, Any]]:
    """Removed examples whose identical content (prompt and response, or messages) stays in the edited
    training set under other ids: ``[{"removed_id": …, "remaining_ids": [...]}]``, in request order.
    The removal then erases little: the model keeps learning the same text from the copies."""
    removed = [p.old for p in pairs if p.new is None]
    if not removed:
        return []
    copies: dict[str, list[str]] = {_content(example): [] for example in removed}
    for example in edited_training_set(train, pairs):
        key = _content(example)
        if key in copies:
            copies[key].append(example.id)
    return [{"removed_id": example.id, "remaining_ids": copies[_content(example)]}
            for example in removed if copies[_content(example)]]


def duplicate_warning(duplicate: dict[str, Any]) -> str:
    """The console and report text of one ``remaining_duplicates`` entry."""
    ids = duplicate["remaining_ids"]
    where = f"id '{ids[0]}'" if len(ids) == 1 else "ids " + ", ".join(f"'{i}'" for i in ids)
    return (f"removed example '{duplicate['removed_id']}' has an identical prompt and response that stays in the "
            f"data under {where} (remove {'that one' if len(ids) == 1 else 'those'} too, or the model keeps "
            "learning it)")


def duplicates_report(train: Sequence[Example], pairs: Sequence[EditPair]) -> list[dict[str, Any]]:
    """The report's ``duplicates_remaining``: each ``remaining_duplicates`` entry with its ``warning`` text."""
    return [{**d, "warning": duplicate_warning(d)} for d in remaining_duplicates(train, pairs)]
