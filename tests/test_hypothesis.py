"""Property-based and fuzz tests (hypothesis) for the request reader and the request → edited-training-set
semantics.

Reader: any well-formed request list round-trips whatever the file layout (BOM, CRLF, blank lines, key
order, escaping); arbitrary bytes, arbitrary JSON values and corrupted valid lines either parse or raise
``InputError`` naming the file and an existing line, never anything else. Semantics: the edited set drops
exactly the removed ids, substitutes exactly the edited fields, keeps the order and every other example;
two request files applied in turn equal their union applied at once; bad references are refused.

Example counts per test (``max_examples``) are set explicitly; run with ``--hypothesis-show-statistics``.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmeraser.data import Example, read_examples
from llmeraser.errors import InputError
from llmeraser.hashing import dataset_hash
from llmeraser.requests import (
    REQUEST_KINDS,
    CorrectResponse,
    ModifyQuery,
    Remove,
    edited_training_set,
    read_requests,
    resolve,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# text: any Unicode except unpaired surrogates (not text), with at least one non-space character
text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip() != "")
ids = st.one_of(text, st.integers(min_value=0, max_value=10**9).map(str))


@st.composite
def request_lists(draw, id_pool=None):
    """Lists of requests with distinct ids (drawn from ``id_pool`` when given)."""
    if id_pool is None:
        chosen = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    else:
        chosen = draw(st.lists(st.sampled_from(id_pool), min_size=1, max_size=len(id_pool), unique=True))
    requests = []
    for request_id in chosen:
        op = draw(st.sampled_from(sorted(REQUEST_KINDS)))
        if op == "remove":
            requests.append(Remove(request_id))
        elif op == "modify_query":
            requests.append(ModifyQuery(request_id, draw(text)))
        else:
            requests.append(CorrectResponse(request_id, draw(text)))
    return requests


@st.composite
def layouts(draw):
    """How a file is laid out: BOM, line ends, blank lines, key order, ASCII escaping, spacing."""
    return {
        "bom": draw(st.booleans()),
        "crlf": draw(st.booleans()),
        "blank_every": draw(st.integers(0, 3)),
        "shuffle_seed": draw(st.integers(0, 2**16)),
        "ascii": draw(st.booleans()),
        "indent_spaces": draw(st.sampled_from(["", " ", "\t"])),
        "final_newline": draw(st.booleans()),
    }


def render(objects: list[dict], layout: dict) -> tuple[bytes, list[int]]:
    """File bytes and the 1-based line number of each object."""
    rng = random.Random(layout["shuffle_seed"])
    lines, numbers = [], []
    for index, obj in enumerate(objects):
        if layout["blank_every"] and index % layout["blank_every"] == 0:
            lines.append(layout["indent_spaces"])
        items = list(obj.items())
        rng.shuffle(items)
        lines.append(layout["indent_spaces"] + json.dumps(dict(items), ensure_ascii=layout["ascii"]))
        numbers.append(len(lines))
    newline = "\r\n" if layout["crlf"] else "\n"
    body = newline.join(lines) + (newline if layout["final_newline"] else "")
    return (b"\xef\xbb\xbf" if layout["bom"] else b"") + body.encode("utf-8"), numbers


def write(data: bytes) -> Path:
    with tempfile.NamedTemporaryFile(prefix="hyp-", suffix=".jsonl", delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


def read_or_error(data: bytes) -> tuple[list | None, InputError | None, int]:
    """Parse ``data`` as a request file: (requests, None) or (None, error); also the number of lines."""
    path = write(data)
    try:
        return read_requests(path), None, data.count(b"\n") + 1
    except InputError as err:
        assert err.path == str(path), err
        assert str(err).startswith(str(path)), err
        return None, err, data.count(b"\n") + 1
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------------- reader


@settings(max_examples=200, **SETTINGS)
@given(request_lists(), layouts())
def test_well_formed_request_files_round_trip_in_any_layout(requests, layout):
    data, numbers = render([r.to_json() for r in requests], layout)
    parsed, error, _ = read_or_error(data)
    assert error is None, error
    assert parsed == requests
    assert [r.source.line for r in parsed] == numbers


@settings(max_examples=300, **SETTINGS)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_fail_with_file_and_line(data):
    parsed, error, lines = read_or_error(data)
    if error is not None:
        assert error.line is None or 1 <= error.line <= lines
        if error.line is None:
            assert error.message == "no requests in file"
    else:
        assert parsed and all(r.op in REQUEST_KINDS for r in parsed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "op": st.one_of(st.sampled_from(sorted(REQUEST_KINDS)), json_values),
        "id": st.one_of(ids, json_values),
        "prompt": st.one_of(text, json_values),
        "response": st.one_of(text, json_values),
        "extra": json_values,
    },
)


@settings(max_examples=300, **SETTINGS)
@given(st.lists(st.one_of(request_like, json_values), min_size=1, max_size=5))
def test_arbitrary_json_lines_parse_to_consistent_requests_or_fail_with_line(values):
    data = "\n".join(json.dumps(v) for v in values).encode("utf-8")
    parsed, error, lines = read_or_error(data)
    if error is not None:
        assert error.line is not None and 1 <= error.line <= lines or error.message == "no requests in file"
        return
    assert len(parsed) == len(values)
    for request, value in zip(parsed, values):
        assert isinstance(value, dict) and value["op"] == request.op and str(value["id"]) == request.id
        assert set(value) <= {"op", "id", "prompt", "response"}
        if request.op == "modify_query":
            assert request.prompt == value["prompt"]
        if request.op == "correct_response":
            assert request.response == value["response"]


@settings(max_examples=300, **SETTINGS)
@given(request_lists(), st.data())
def test_corrupted_valid_files_parse_or_fail_with_line(requests, data):
    raw, _ = render([r.to_json() for r in requests], {"bom": False, "crlf": False, "blank_every": 0,
                                                       "shuffle_seed": 0, "ascii": True, "indent_spaces": "",
                                                       "final_newline": True})
    position = data.draw(st.integers(0, len(raw) - 1))
    mutation = data.draw(st.sampled_from(["delete", "replace", "insert"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    if mutation == "delete":
        corrupted = raw[:position] + raw[position + 1 :]
    elif mutation == "replace":
        corrupted = raw[:position] + byte + raw[position + 1 :]
    else:
        corrupted = raw[:position] + byte + raw[position:]
    parsed, error, lines = read_or_error(corrupted)
    if error is not None:
        assert error.line is None or 1 <= error.line <= lines
    else:
        assert all(r.op in REQUEST_KINDS for r in parsed)


@settings(max_examples=150, **SETTINGS)
@given(request_lists(), st.integers(0, 7), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"{", b"[]", b'{"op": "remove"}']))
def test_the_first_bad_line_is_the_one_reported(requests, where, bad):
    lines = [json.dumps(r.to_json()).encode() for r in requests]
    where = min(where, len(lines))
    lines.insert(where, bad)
    lines.append(b"\xff garbage after the first bad line")
    _, error, _ = read_or_error(b"\n".join(lines))
    assert error is not None and error.line == where + 1, (error, where)


@settings(max_examples=100, **SETTINGS)
@given(st.lists(st.builds(lambda i, p, r: Example(i, p, r), ids, text, text), min_size=1, max_size=8,
                unique_by=lambda e: e.id), layouts())
def test_training_files_round_trip_and_hash_independently_of_layout(examples, layout):
    data, _ = render([e.to_json() for e in examples], layout)
    path = write(data)
    try:
        parsed = read_examples(path)
    finally:
        path.unlink()
    assert parsed == examples
    assert dataset_hash(parsed) == dataset_hash(examples)


# ----------------------------------------------------------------------------------------------- semantics


@st.composite
def training_and_requests(draw):
    examples = draw(st.lists(st.builds(lambda i, p, r: Example(i, p, r), ids, text, text), min_size=2, max_size=12,
                             unique_by=lambda e: e.id))
    requests = draw(request_lists([e.id for e in examples]))
    return examples, requests


@settings(max_examples=300, **SETTINGS)
@given(training_and_requests())
def test_edited_set_drops_removed_substitutes_edited_keeps_the_rest_in_order(case):
    train, requests = case
    removals = sum(isinstance(r, Remove) for r in requests)
    assume(removals < len(train))
    edited = edited_training_set(train, resolve(requests, train))
    by_request = {r.id: r for r in requests}
    assert len(edited) == len(train) - removals
    assert [e.id for e in edited] == [e.id for e in train if not isinstance(by_request.get(e.id), Remove)]
    originals = {e.id: e for e in train}
    for example in edited:
        request, old = by_request.get(example.id), originals[example.id]
        if request is None:
            assert example == old
        elif isinstance(request, ModifyQuery):
            assert (example.prompt, example.response) == (request.prompt, old.response)
        else:
            assert (example.prompt, example.response) == (old.prompt, request.response)


@settings(max_examples=200, **SETTINGS)
@given(training_and_requests(), st.data())
def test_two_request_files_in_turn_equal_their_union_at_once(case, data):
    train, requests = case
    assume(len(requests) >= 2 and sum(isinstance(r, Remove) for r in requests) < len(train))
    split = data.draw(st.integers(1, len(requests) - 1))
    first, second = requests[:split], requests[split:]
    once = edited_training_set(train, resolve(requests, train))
    middle = edited_training_set(train, resolve(first, train))
    twice = edited_training_set(middle, resolve(second, middle))
    assert twice == once and dataset_hash(twice) == dataset_hash(once)


@settings(max_examples=200, **SETTINGS)
@given(training_and_requests(), ids)
def test_unknown_ids_repeated_ids_and_removing_everything_are_refused(case, stranger):
    train, requests = case
    known = {e.id for e in train}
    if stranger not in known:
        with pytest.raises(InputError, match="is not in the training data"):
            resolve([*requests, Remove(stranger)], train)
    with pytest.raises(InputError, match="duplicate id"):
        resolve([*requests, Remove(requests[0].id)], train)
    with pytest.raises(InputError, match="would remove every training example"):
        resolve([Remove(e.id) for e in train], train)
