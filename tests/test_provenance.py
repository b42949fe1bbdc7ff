"""The training record ties an adapter to its base model, data and recipe: the loss scope it was trained
with is recorded and reused by later erasures."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import FAST_TRAIN, cli
from conftest import toy_examples

from llmeraser.data import write_examples

UPDATE = ["--mode", "update", "--solver", "cg", "--max-iters", "5", "--damping", "0.01"]  # not direct: forms H


@pytest.fixture(scope="module")
def scope_all(tmp_path_factory):
    """An adapter trained with ``--loss-scope all`` and its data and requests."""
    root = tmp_path_factory.mktemp("scope")
    data, requests = root / "train.jsonl", root / "requests.jsonl"
    write_examples(data, toy_examples(8, seed=1))
    requests.write_text('{"op": "remove", "id": "ex1"}\n')
    adapter = root / "adapter"
    done = cli("train", "--model", "tiny", "--data", data, "--out", adapter, *FAST_TRAIN, "--epochs", "1",
               "--loss-scope", "all")
    assert done.code == 0, done.err
    return root, data, requests, adapter


def test_loss_scope_is_recorded_and_reused_by_erase(scope_all):
    root, data, requests, adapter = scope_all
    record = json.loads((adapter / "llmeraser_training.json").read_text())
    assert record["recipe"]["loss_scope"] == "all"
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", root / "e", *UPDATE)
    assert done.code == 0, done.err
    report = json.loads((root / "e" / "erasure_report.json").read_text())
    assert report["config"]["loss_scope"] == "all"  # from the record, not passed again
    assert json.loads((root / "e" / "llmeraser_training.json").read_text())["recipe"]["loss_scope"] == "all"
    # the scope changes what is differentiated: an explicit --loss-scope response gives another b
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", root / "r", *UPDATE,
               "--loss-scope", "response")
    assert done.code == 0, done.err
    other = json.loads((root / "r" / "erasure_report.json").read_text())
    assert other["config"]["loss_scope"] == "response"
    assert other["b_norm"] != pytest.approx(report["b_norm"], rel=1e-6)


def test_fingerprint_survives_save_pretrained_and_names_what_differs(tmp_path):
    from llmeraser.hashing import fingerprint_differences, fingerprint_parts, model_fingerprint
    from llmeraser.models import build_tiny_model, load_base_model

    targets = ("q_proj", "v_proj")
    base, _ = load_base_model("tiny")
    for seed, name in ((0, "same"), (7, "other")):
        model, tokenizer = build_tiny_model(seed=seed)
        model.config.architectures = ["SomethingElse"]  # config keys save_pretrained rewrites are not hashed
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    resaved, _ = load_base_model(str(tmp_path / "same"))
    assert model_fingerprint(resaved, targets) == model_fingerprint(base, targets)
    other, _ = load_base_model(str(tmp_path / "other"))
    assert model_fingerprint(other, targets) != model_fingerprint(base, targets)
    message = fingerprint_differences(fingerprint_parts(base, targets), fingerprint_parts(other, targets))
    assert "the input embeddings" in message and "the q_proj weights" in message and "the v_proj weights" in message
    # only the targeted weights count: an edit elsewhere keeps the fingerprint, one in a target changes it
    with torch.no_grad():
        resaved.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert model_fingerprint(resaved, targets) == model_fingerprint(base, targets)
    with torch.no_grad():
        resaved.model.layers[1].self_attn.v_proj.weight.add_(1.0)
    message = fingerprint_differences(fingerprint_parts(base, targets), fingerprint_parts(resaved, targets))
    assert message.startswith("they differ in the v_proj weights") and "the same: the input embeddings, the q_proj" in message


def test_a_regex_target_modules_survives_the_record_round_trip():
    """PEFT's target_modules may be one regex (a str): the record keeps it a str, not its characters."""
    from llmeraser.adapter import LoraSettings
    from llmeraser.provenance import TrainingRecord
    from llmeraser.train import TrainConfig

    for targets in (r".*\.(q_proj|v_proj)", ("q_proj", "v_proj")):
        record = TrainingRecord("tiny", "f" * 64, "d" * 64, 8, TrainConfig(), LoraSettings(target_modules=targets))
        again = TrainingRecord.from_json(json.loads(json.dumps(record.to_json())))
        assert again.lora.target_modules == targets
