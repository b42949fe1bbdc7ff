"""Audit lineage: the hash chain (unit), and ``llmeraser history`` on adapters written by train and erase,
intact and tampered with (entries edited, re-hashed, removed, reordered; weights swapped)."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import FAST_TRAIN, cli, digest
from conftest import toy_examples

from llmeraser.data import write_examples
from llmeraser.lineage import (
    GENESIS,
    LINEAGE_FILE,
    append_entry,
    canonical_json,
    entry_digest,
    lineage_text,
    read_lineage,
    seal,
    verify_chain,
)


def chain(n: int) -> list[dict]:
    entries: list[dict] = []
    for i in range(n):
        entries = append_entry(entries, {"command": "erase", "step": i, "input_adapter_sha256": f"a{i}",
                                         "output_adapter_sha256": f"a{i + 1}", "residual": 0.5 / (i + 1)})
    return entries


def test_an_intact_chain_verifies_and_links_each_entry_to_the_previous():
    entries = chain(4)
    assert verify_chain(entries) == []
    assert entries[0]["prev_sha256"] == GENESIS
    for before, after in zip(entries, entries[1:]):
        assert after["prev_sha256"] == before["entry_sha256"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert verify_chain(entries, adapter_hash="a4") == []


def test_append_does_not_modify_its_input_and_hash_ignores_key_order():
    entries = chain(2)
    before = json.dumps(entries)
    longer = append_entry(entries, {"command": "erase"})
    assert json.dumps(entries) == before and len(longer) == 3
    shuffled = dict(reversed(list(longer[2].items())))
    assert entry_digest(shuffled) == longer[2]["entry_sha256"]


def test_non_finite_numbers_are_hashed_as_strict_json():
    entry = seal({"residual": float("nan"), "norm": float("inf")}, [])
    assert entry["residual"] == "nan" and entry["norm"] == "inf"
    json.loads(canonical_json(entry))  # strict JSON
    assert verify_chain([entry]) == []


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda e: e[1].update(residual=0.0), "entry #1 (line 2): its content does not match its entry_sha256"),
        (lambda e: e[1].update(residual=0.0, entry_sha256=entry_digest({**e[1], "residual": 0.0})),
         "entry #2 (line 3): prev_sha256 does not link to entry #1"),
        (lambda e: e.pop(1), "entry #1 (line 2): records index 2"),
        (lambda e: e.insert(0, e.pop(2)), "entry #0 (line 1): prev_sha256 does not start the chain"),
        (lambda e: e[2].pop("entry_sha256"), "entry #2 (line 3): no entry_sha256"),
        (lambda e: e.__setitem__(2, seal({**e[2], "input_adapter_sha256": "zz"}, e[:2])),
         "entry #2 (line 3): its input adapter is not the output of entry #1"),
    ],
    ids=["edited", "edited-and-rehashed", "removed", "reordered", "hash-stripped", "resealed-other-input"],
)
def test_tampering_is_reported_naming_the_entry(tamper, expected):
    entries = chain(4)
    tamper(entries)
    problems = verify_chain(entries)
    assert any(expected in p for p in problems), problems


def test_weights_swapped_after_the_last_entry_are_reported():
    problems = verify_chain(chain(2), adapter_hash="something-else")
    assert problems == [
        "entry #1: the adapter's weights are not the ones this entry wrote "
        "(adapter_model.safetensors or adapter_config.json changed afterwards)"
    ]


# ------------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def erased_twice(tmp_path_factory):
    """train → erase → apply-requests → erase again, through the command line."""
    root = tmp_path_factory.mktemp("lineage")
    data = root / "train.jsonl"
    write_examples(data, toy_examples(12, seed=5))
    first, second = root / "r1.jsonl", root / "r2.jsonl"
    first.write_text('{"op": "remove", "id": "ex1"}\n{"op": "correct_response", "id": "ex4", "response": " Maybe"}\n')
    second.write_text('{"op": "modify_query", "id": "ex2", "prompt": "Is it nice?"}\n')
    adapter, erased, erased2, edited = root / "adapter", root / "erased", root / "erased2", root / "edited.jsonl"
    assert cli("train", "--model", "tiny", "--data", data, "--out", adapter, *FAST_TRAIN).code == 0
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", first, "--out", erased, "--damping", "0.1")
    assert done.code == 0, done.err
    done = cli("apply-requests", "--data", data, "--requests", first, "--out", edited)
    assert done.code == 0, done.err
    done = cli("erase", "--adapter", erased, "--data", edited, "--requests", second, "--out", erased2, "--damping", "0.1")
    assert done.code == 0, done.err
    return root, data, adapter, erased, erased2, first, second


def test_history_prints_the_chain_and_verifies_it(erased_twice):
    _, _, adapter, erased, erased2, first, second = erased_twice
    done = cli("history", erased2)
    assert done.code == 0, done.err
    assert "lineage of" in done.out and "3 entries" in done.out
    assert "#0" in done.out and "train" in done.out and done.out.count("erase") >= 2
    assert "chain verified" in done.out
    entries = read_lineage(erased2)
    assert [e["command"] for e in entries] == ["train", "erase", "erase"]
    assert read_lineage(erased) == entries[:2]  # carried over unchanged
    assert read_lineage(adapter) == entries[:1]


def test_an_erase_entry_records_hashes_settings_and_result(erased_twice):
    from llmeraser.hashing import adapter_hash, dataset_hash, sha256_file

    root, data, adapter, erased, _, first, _ = erased_twice
    entry = read_lineage(erased)[1]
    assert entry["tool"] == "llmeraser" and entry["tool_version"] and entry["time"].endswith("+00:00")
    assert entry["requests_file_sha256"] == sha256_file(first)
    assert entry["input_adapter_sha256"] == adapter_hash(adapter)
    assert entry["output_adapter_sha256"] == adapter_hash(erased)
    from llmeraser.data import read_examples

    assert entry["data_before_sha256"] == dataset_hash(read_examples(data))
    assert entry["data_after_sha256"] == dataset_hash(read_examples(root / "edited.jsonl"))
    assert entry["n_examples_before"] == 12 and entry["n_examples_after"] == 11
    assert [a["op"] for a in entry["affected_examples"]] == ["remove", "correct_response"]
    assert entry["solver_settings"]["damping"] == 0.1 and entry["solver_settings"]["solver"] == "cg"
    assert entry["result"]["status"] and entry["result"]["damping_used"] == 0.1
    report = json.loads((erased / "erasure_report.json").read_text())
    assert report["output_adapter_sha256"] == entry["output_adapter_sha256"]


def copy_of(source, target):
    shutil.copytree(source, target)
    return target


def test_a_tampered_entry_is_reported_by_history_with_exit_3(erased_twice, tmp_path):
    _, _, _, _, erased2, _, _ = erased_twice
    tampered = copy_of(erased2, tmp_path / "tampered")
    lines = (tampered / LINEAGE_FILE).read_text().splitlines()
    entry = json.loads(lines[1])
    entry["n_examples_before"] = 999
    lines[1] = canonical_json(entry)
    (tampered / LINEAGE_FILE).write_text("\n".join(lines) + "\n")
    done = cli("history", tampered)
    assert done.code == 3
    assert "entry #1 (line 2): its content does not match its entry_sha256" in done.err
    assert "lineage does not verify" in done.err


def test_a_removed_entry_and_a_truncated_line_are_reported(erased_twice, tmp_path):
    _, _, _, _, erased2, _, _ = erased_twice
    removed = copy_of(erased2, tmp_path / "removed")
    lines = (removed / LINEAGE_FILE).read_text().splitlines()
    (removed / LINEAGE_FILE).write_text(lines[0] + "\n" + lines[2] + "\n")
    done = cli("history", removed)
    assert done.code == 3 and "entry #1 (line 2)" in done.err and "does not link to entry #0" in done.err
    cut = copy_of(erased2, tmp_path / "cut")
    text = (cut / LINEAGE_FILE).read_text()
    (cut / LINEAGE_FILE).write_text(text[: len(text) - 40])
    done = cli("history", cut)
    assert done.code == 3 and f"{LINEAGE_FILE}:3: malformed JSON" in done.err


def test_swapped_weights_are_reported_and_erasing_on_top_is_refused(erased_twice, tmp_path):
    root, data, adapter, erased, erased2, _, second = erased_twice
    swapped = copy_of(erased, tmp_path / "swapped")
    shutil.copy(adapter / "adapter_model.safetensors", swapped / "adapter_model.safetensors")
    done = cli("history", swapped)
    assert done.code == 3 and "the adapter's weights are not the ones this entry wrote" in done.err
    before = digest(swapped)
    done = cli("erase", "--adapter", swapped, "--data", root / "edited.jsonl", "--requests", second,
               "--out", tmp_path / "out", "--damping", "0.1")
    assert done.code == 3 and "lineage.jsonl does not verify" in done.err
    assert not (tmp_path / "out").exists() and digest(swapped) == before
    done = cli("erase", "--adapter", swapped, "--data", root / "edited.jsonl", "--requests", second,
               "--out", tmp_path / "out", "--damping", "0.1", "--allow-mismatch")
    assert done.code == 0, done.err
    entry = read_lineage(tmp_path / "out")[-1]
    assert any("weights are not the ones" in m for m in entry["mismatches_allowed"])
    assert cli("history", tmp_path / "out").code == 3  # the old break stays visible


def test_erasing_on_top_with_the_original_data_says_how_to_build_the_edited_set(erased_twice, tmp_path):
    root, data, _, erased, _, _, second = erased_twice
    done = cli("erase", "--adapter", erased, "--data", data, "--requests", second, "--out", tmp_path / "x")
    assert done.code == 3
    assert "is the training data as it was before erase entry #1" in done.err
    assert "llmeraser apply-requests" in done.err


def test_history_of_a_directory_without_lineage_is_an_input_error(erased_twice, tmp_path):
    _, _, adapter, _, _, _, _ = erased_twice
    bare = copy_of(adapter, tmp_path / "bare")
    (bare / LINEAGE_FILE).unlink()
    done = cli("history", bare)
    assert done.code == 3 and "no lineage.jsonl" in done.err
    assert cli("history", tmp_path / "missing").code == 3


def test_history_json_lists_entries_and_problems(erased_twice):
    _, _, _, _, erased2, _, _ = erased_twice
    done = cli("history", erased2, "--json")
    assert done.code == 0
    parsed = json.loads(done.out)
    assert parsed["problems"] == [] and len(parsed["entries"]) == 3
    assert lineage_text(parsed["entries"]) == (erased2 / LINEAGE_FILE).read_text()
