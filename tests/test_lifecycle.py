"""Adapters trained outside llmeraser (plain PEFT), checked: the base model from ``adapter_config.json``,
recipe values asked for instead of assumed, a base model of other shapes refused with names and shapes,
and the first erase writing the record it assumed so that the next one is checked."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import cli
from conftest import toy_examples

from llmeraser.data import write_examples
from llmeraser.models import build_tiny_model, load_base_model

UPDATE = ["--mode", "update", "--solver", "cg", "--max-iters", "5", "--damping", "0.01"]  # not direct: forms H
RECIPE = ["--weight-decay", "0.01", "--max-length", "128", "--loss-scope", "response"]


def save_peft_adapter(path, seed=0):
    """A LoRA adapter on the tiny model written by PEFT itself (no llmeraser record), lora_B ≠ 0."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_base_model("tiny")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    data, requests = root / "train.jsonl", root / "requests.jsonl"
    write_examples(data, toy_examples(8, seed=2))
    requests.write_text('{"op": "remove", "id": "ex1"}\n{"op": "correct_response", "id": "ex2", "response": " Maybe"}\n')
    return root, data, requests, save_peft_adapter(root / "peft-adapter")


def test_missing_recipe_values_are_refused_naming_the_flags(outside):
    root, data, requests, adapter = outside
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", root / "never", *UPDATE)
    assert done.code == 3
    assert "no llmeraser training record" in done.err
    for flag in ("--weight-decay", "--max-length", "--loss-scope"):
        assert flag in done.err
    assert not (root / "never").exists()
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", root / "never",
               "--weight-decay", "0", *UPDATE)  # only the missing ones are listed
    assert done.code == 3 and "--weight-decay" not in done.err.split("pass ")[1].split("(")[0]
    assert not (root / "never").exists()
    done = cli("evaluate", "--adapter", adapter, "--data", data)  # read-only: it says what it uses
    assert done.code == 0, done.err
    assert "no llmeraser training record: evaluating with --max-length 256 --loss-scope response" in done.err


def test_first_erase_takes_the_base_from_adapter_config_and_writes_the_assumed_record(outside):
    root, data, requests, adapter = outside
    first = root / "first"
    done = cli("erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", first, *RECIPE, *UPDATE)
    assert done.code == 0, done.err  # no --model: adapter_config.json's base_model_name_or_path ("tiny")
    record = json.loads((first / "llmeraser_training.json").read_text())
    assert record["model"] == "tiny" and record["origin"].startswith("assumed")
    assert record["recipe"]["weight_decay"] == 0.01 and record["recipe"]["max_length"] == 128
    assert record["n_examples"] == 7 and set(record["model_fingerprint_parts"]) == {"input_embeddings", "q_proj", "v_proj"}
    report = json.loads((first / "erasure_report.json").read_text())
    assert report["training_record"].startswith("assumed") and report["config"]["weight_decay"] == 0.01
    assert cli("history", first).code == 0  # the lineage verifies

    # the next erase is checked against that record: the original data is refused, the edited set accepted
    again = root / "again.jsonl"
    again.write_text('{"op": "remove", "id": "ex3"}\n')
    done = cli("erase", "--adapter", first, "--data", data, "--requests", again, "--out", root / "x", *UPDATE)
    assert done.code == 3 and "is not the data the adapter was trained on" in done.err
    assert not (root / "x").exists()
    edited = root / "edited.jsonl"
    assert cli("apply-requests", "--data", data, "--requests", requests, "--out", edited).code == 0
    done = cli("erase", "--adapter", first, "--data", edited, "--requests", again, "--out", root / "second", *UPDATE)
    assert done.code == 0, done.err  # no recipe flags: the record says them now
    report = json.loads((root / "second" / "erasure_report.json").read_text())
    assert report["config"]["weight_decay"] == 0.01 and report["config"]["max_length"] == 128
    # an assumed recipe is not one llmeraser can rerun: no paired retrain from it
    done = cli("retrain", "--like", first, "--data", edited, "--requests", again, "--out", root / "rt")
    assert done.code == 3 and "not a recipe llmeraser train ran" in done.err and not (root / "rt").exists()
    done = cli("erase", "--adapter", first, "--data", edited, "--requests", again, "--out", root / "rt", "--mode", "retrain")
    assert done.code == 3 and "--mode retrain needs" in done.err and not (root / "rt").exists()


def test_base_model_of_other_shapes_exits_3_with_names_and_shapes(outside):
    root, data, requests, adapter = outside
    wider = root / "wider-base"
    model, tokenizer = build_tiny_model(hidden_size=64)
    model.save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    done = cli("erase", "--model", wider, "--adapter", adapter, "--data", data, "--requests", requests,
               "--out", root / "never2", *RECIPE, *UPDATE)
    assert done.code == 3, done.err
    assert "do not fit the adapter" in done.err and "q_proj.weight is (64, 64) in the base model" in done.err
    assert "(lora_A (2, 32), lora_B (32, 2)) expect (32, 32)" in done.err
    assert "Traceback" not in done.err and "size mismatch" not in done.err
    assert not (root / "never2").exists()
