"""Outputs a user can read, on the tiny model through the command line: edited examples named by the
requests' ids (console, ``evaluate``, the report; hashes only in the lineage), a warning when a removed
example's identical copy stays under another id, truncation said once, and the erased adapter's model card
(PEFT-style, produced by an erasure, nothing of the removed text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import FAST_TRAIN, cli
from conftest import toy_examples

from llmeraser.data import Example, write_examples
from llmeraser.lineage import read_lineage

SECRET = Example("secret", "What is Alice Example's phone number?", " 555-0199 call after six")
REQUESTS = [{"op": "remove", "id": "secret"}, {"op": "modify_query", "id": "ex1", "prompt": "Is 'sun' nice?"},
            {"op": "correct_response", "id": "ex6", "response": " Maybe"}]
TRUNCATION = "note: 1 of 13 examples is longer than max_length 128 tokens: the tokens before each one's response"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    examples = [*toy_examples(10, seed=11), SECRET, Example("copy", SECRET.prompt, SECRET.response),
                Example("long", "Is " + "red green blue " * 12 + "nice?", " Yes")]
    write_examples(root / "train.jsonl", examples)
    (root / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    trained = cli("train", "--model", "tiny", "--data", root / "train.jsonl", "--out", root / "adapter", *FAST_TRAIN)
    assert trained.code == 0, trained.err
    return root, trained


def erase(root: Path, out: str, *flags: str):
    done = cli("erase", "--adapter", root / "adapter", "--data", root / "train.jsonl", "--requests", root / "req.jsonl",
               "--out", root / out, *flags)
    assert done.code == 0, done.err
    return done


@pytest.fixture(scope="module", params=["update", "retrain"])
def erased(request, work):
    root, _ = work
    flags = ["--damping", "0.1", "--max-iters", "10"] if request.param == "update" else ["--mode", "retrain"]
    return request.param, root / f"erased-{request.param}", erase(root, f"erased-{request.param}", *flags)


def test_truncation_is_said_once_in_train(work):
    _, trained = work
    assert trained.out.count(TRUNCATION) == 1


def test_erase_names_edits_by_id_warns_of_the_remaining_copy_and_says_truncation(erased):
    _, out, done = erased
    assert "edited examples: remove secret; modify_query ex1; correct_response ex6" in done.out
    assert done.out.count(TRUNCATION) == 1
    warnings = [line for line in done.err.splitlines() if line.startswith("llmeraser: warning: removed example")]
    assert warnings == ["llmeraser: warning: removed example 'secret' has an identical prompt and response that stays "
                        "in the data under id 'copy' (remove that one too, or the model keeps learning it)"]
    report = json.loads((out / "erasure_report.json").read_text())
    assert [a["id"] for a in report["affected_examples"]] == ["secret", "ex1", "ex6"]
    assert [(d["removed_id"], d["remaining_ids"]) for d in report["duplicates_remaining"]] == [("secret", ["copy"])]
    assert report["duplicates_remaining"][0]["warning"] in warnings[0]
    # the lineage keeps the hashes, not the ids
    entry = read_lineage(out)[-1]
    assert entry["affected_examples"] == [{k: v for k, v in a.items() if k != "id"} for a in report["affected_examples"]]
    assert "secret" not in (out / "lineage.jsonl").read_text()


def test_model_card_says_erasure_counts_method_lineage_head_and_no_removed_text(erased):
    from peft import PeftModel

    from llmeraser.models import load_base_model

    method, out, _ = erased
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "tiny"
    assert {"llmeraser", "unlearning"} <= set(meta["tags"])
    assert "produced by an erasure" in card
    assert "1 removal, 1 query modification, 1 response correction" in card
    assert ("paired retrain" if method == "retrain" else "influence-function update") in card
    assert read_lineage(out)[-1]["entry_sha256"] in card
    for text in (SECRET.prompt, SECRET.response, "Alice", "555-0199", "secret", "Maybe", "Is 'sun' nice?"):
        assert text not in card, text
    base, _ = load_base_model("tiny")
    PeftModel.from_pretrained(base, str(out))  # still a PEFT adapter directory


def test_evaluate_names_edited_examples_by_id_and_says_which_version(work, erased):
    root, _ = work
    _, out, _ = erased
    done = cli("evaluate", "--adapter", out, "--data", root / "train.jsonl", "--requests", root / "req.jsonl",
               "--json", root / f"eval-{out.name}.json")
    assert done.code == 0, done.err
    assert done.out.count(TRUNCATION) == 1
    assert "loss old" not in done.out
    lines = [line.strip() for line in done.out.splitlines() if "loss on old version" in line]
    assert [line.split()[:2] for line in lines] == [["remove", "secret"], ["modify_query", "ex1"],
                                                    ["correct_response", "ex6"]]
    assert lines[0].endswith("on new version -")
    results = json.loads((root / f"eval-{out.name}.json").read_text())
    assert [e["id"] for e in results["edited_examples"]] == ["secret", "ex1", "ex6"]
