"""Request files: parsing and its error messages, resolution against the training set, edited sets."""

from __future__ import annotations

import json

import pytest

from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser.requests import (
    CorrectResponse,
    ModifyQuery,
    Remove,
    affected_examples,
    count_by_kind,
    describe_edits,
    edited_training_set,
    read_requests,
    remaining_duplicates,
    request_from_json,
    resolve,
    write_requests,
)

TRAIN = [Example(f"e{i}", f"prompt {i}", f"response {i}") for i in range(5)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def dumps(**obj):
    return json.dumps(obj)


def test_read_mixed_ops(tmp_path):
    path = write_lines(
        tmp_path / "req.jsonl",
        [
            dumps(op="remove", id="e1"),
            "",
            dumps(op="modify_query", id="e2", prompt="new prompt"),
            dumps(op="correct_response", id=3, response="new response"),
        ],
    )
    requests = read_requests(path)
    assert requests == [Remove("e1"), ModifyQuery("e2", "new prompt"), CorrectResponse("3", "new response")]
    assert [(r.source.path, r.source.line) for r in requests] == [(str(path), 1), (str(path), 3), (str(path), 4)]


GOOD = dumps(op="remove", id="e0")


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (dumps(op="forget", id="e1"), "unknown op 'forget' (expected one of: remove, modify_query, correct_response)"),
        (dumps(op=3, id="e1"), "unknown op 3"),
        (dumps(op=["remove"], id="e1"), "unknown op ['remove']"),
        (dumps(id="e1"), "missing field 'op'"),
        (dumps(op="remove"), "missing field 'id'"),
        (dumps(op="modify_query", id="e1"), "missing field 'prompt'"),
        (dumps(op="correct_response", id="e1"), "missing field 'response'"),
        (dumps(op="correct_response", id="e1", response=""), "field 'response' is empty"),
        (dumps(op="modify_query", id="e1", prompt=5), "field 'prompt' must be a string"),
        (dumps(op="remove", id="e1", response="x"), "unexpected field(s) for op 'remove': response"),
        (dumps(op="modify_query", id="e1", prompt="p", response="r"), "unexpected field(s) for op 'modify_query': response"),
        (dumps(op="correct_response", id="e0", response="r"), "duplicate id 'e0' (already requested on line 1)"),
        ('{"op": "remove", "id": ', "malformed JSON"),
        ('"remove e1"', "expected a JSON object, got str"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "requests.jsonl", [GOOD, bad_line])
    with pytest.raises(InputError) as info:
        read_requests(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: "), message
    assert problem in message, message


def test_empty_request_file(tmp_path):
    path = write_lines(tmp_path / "requests.jsonl", ["", "  "])
    with pytest.raises(InputError, match=r"requests\.jsonl: no requests in file"):
        read_requests(path)


def test_request_without_file_context():
    with pytest.raises(InputError, match="^unknown op 'x'"):
        request_from_json({"op": "x", "id": "a"})
    assert request_from_json({"op": "remove", "id": "a"}) == Remove("a")


def test_round_trip(tmp_path):
    requests = [Remove("e1"), ModifyQuery("e2", "ünïcode\nprompt"), CorrectResponse("e3", 'a "quoted" answer')]
    write_requests(tmp_path / "out" / "requests.jsonl", requests)
    assert read_requests(tmp_path / "out" / "requests.jsonl") == requests
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["requests.jsonl"]  # no temporary file left


def test_resolve_pairs_old_and_new():
    requests = [Remove("e1"), ModifyQuery("e2", "new prompt"), CorrectResponse("e4", "new response")]
    pairs = resolve(requests, TRAIN)
    assert [(p.old, p.new) for p in pairs] == [
        (TRAIN[1], None),
        (TRAIN[2], Example("e2", "new prompt", "response 2")),
        (TRAIN[4], Example("e4", "prompt 4", "new response")),
    ]
    assert [p.request for p in pairs] == requests


def test_resolve_unknown_id_names_the_request_file_and_line(tmp_path):
    path = write_lines(tmp_path / "requests.jsonl", [dumps(op="remove", id="e1"), dumps(op="remove", id="nope")])
    with pytest.raises(InputError) as info:
        resolve(read_requests(path), TRAIN)
    assert str(info.value) == f"{path}:2: id 'nope' is not in the training data"


def test_resolve_refuses_to_remove_everything():
    with pytest.raises(InputError, match="would remove every training example"):
        resolve([Remove(e.id) for e in TRAIN], TRAIN)
    assert len(resolve([Remove(e.id) for e in TRAIN[:-1]], TRAIN)) == 4


def test_resolve_rejects_duplicates_and_empty_request_lists():
    with pytest.raises(InputError, match="duplicate id 'e1'"):
        resolve([Remove("e1"), CorrectResponse("e1", "x")], TRAIN)
    with pytest.raises(InputError, match="no requests"):
        resolve([], TRAIN)


def test_edited_training_set():
    requests = [CorrectResponse("e4", "fixed"), Remove("e1"), ModifyQuery("e2", "new prompt")]
    edited = edited_training_set(TRAIN, resolve(requests, TRAIN))
    assert edited == [
        TRAIN[0],
        Example("e2", "new prompt", "response 2"),
        TRAIN[3],
        Example("e4", "prompt 4", "fixed"),
    ]
    assert TRAIN[2] == Example("e2", "prompt 2", "response 2")  # the input is not modified


def test_count_by_kind():
    requests = [Remove("a"), Remove("b"), CorrectResponse("c", "r")]
    assert count_by_kind(requests) == {"remove": 2, "modify_query": 0, "correct_response": 1}
    assert count_by_kind([]) == {"remove": 0, "modify_query": 0, "correct_response": 0}


def test_remaining_duplicates_name_the_removed_and_the_kept_ids():
    from llmeraser.requests import duplicate_warning

    train = [Example("a", "P", " R"), Example("b", "Q", " S"), Example("c", "P", " R"), Example("d", "P", " R")]
    found = remaining_duplicates(train, resolve([Remove("a"), Remove("b")], train))
    assert found == [{"removed_id": "a", "remaining_ids": ["c", "d"]}]
    assert duplicate_warning(found[0]) == ("removed example 'a' has an identical prompt and response that stays in "
                                           "the data under ids 'c', 'd' (remove those too, or the model keeps learning it)")
    # every copy removed, or the copy corrected: nothing identical remains
    assert remaining_duplicates(train, resolve([Remove("a"), Remove("c"), Remove("d")], train)) == []
    assert remaining_duplicates(train, resolve([Remove("a"), CorrectResponse("c", " T"), Remove("d")], train)) == []
    # two removed copies of one text, one kept: both removals are named
    assert remaining_duplicates(train, resolve([Remove("c"), Remove("a")], train)) == [
        {"removed_id": "c", "remaining_ids": ["d"]}, {"removed_id": "a", "remaining_ids": ["d"]}]
    # a same prompt with another response is no duplicate; edits are not removals
    assert remaining_duplicates(train, resolve([CorrectResponse("a", " X")], train)) == []


def test_edits_are_described_and_recorded_by_the_requests_ids():
    train = [Example(f"e{i}", f"P{i}", " R") for i in range(15)]
    pairs = resolve([Remove(f"e{i}") for i in range(12)] + [CorrectResponse("e13", " S")], train)
    assert describe_edits(pairs) == ("remove e0, e1, e2, e3, e4, e5, e6, e7, e8, e9 and 2 more; "
                                     "correct_response e13")
    recorded = affected_examples(pairs)
    assert [r["id"] for r in recorded] == [*(f"e{i}" for i in range(12)), "e13"]
    assert recorded[0]["new_sha256"] is None and recorded[-1]["new_sha256"] != recorded[-1]["old_sha256"]
