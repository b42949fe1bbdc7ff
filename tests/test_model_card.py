"""The erased adapter's model card: PEFT-style front matter, what produced it, and none of the removed text."""

from __future__ import annotations

import json

import yaml

from llmeraser.model_card import erasure_model_card, lineage_head


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_counts_method_and_lineage_head():
    report = {"requests": {"remove": 2, "modify_query": 0, "correct_response": 1}, "n_train": 10,
              "config": {"curvature": "gauss-newton"}, "solver": {"solver": "cg"}, "method": "update",
              "input_adapter_sha256": "ab" * 32}
    card = erasure_model_card(report, "HuggingFaceTB/SmolLM2-135M-Instruct", "cd" * 32)
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"llmeraser", "unlearning"} <= set(meta["tags"])
    assert "produced by an erasure" in card
    assert "2 removals, 0 query modifications, 1 response correction" in card
    assert "influence-function update (gauss-newton curvature, cg solver)" in card
    assert "10 before, 8 after" in card and "cd" * 32 in card and "ab" * 32 in card
    retrain = erasure_model_card({**report, "method": "retrain"}, None, None)
    assert "paired retrain" in retrain and "base_model" not in front_matter(retrain)


def test_lineage_head_is_the_last_entry_hash():
    text = json.dumps({"entry_sha256": "1"}) + "\n" + json.dumps({"entry_sha256": "2"}) + "\n"
    assert lineage_head(text) == "2" and lineage_head("") is None and lineage_head(None) is None
