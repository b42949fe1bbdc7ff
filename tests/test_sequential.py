"""Sequential erasure: erasing on top of an erased adapter (with the edited training set that its lineage
and training record name) agrees with one combined erasure of both request files.

Two Newton steps from θ̂ (the second from θ₁ over the edited set) and one step from θ̂ differ only by
the change of curvature and gradients along the first step (second order in the step). On the
well-conditioned recipe of the CLI tests (weight decay 0.1, trained to convergence) we require the
difference to be small against the update itself, and smaller than the combined update's own distance to
exact retraining, in parameters and in function space (KL on the training examples): sequential erasure
adds less error than the method itself has.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import cli
from conftest import one_thread, toy_examples

from llmeraser.data import read_examples, write_examples
from llmeraser.evaluate import function_space_distance
from llmeraser.hashing import dataset_hash
from llmeraser.lineage import read_lineage
from llmeraser.model import AdapterParameters, adapter_vector, load_adapter, load_base_model

TRAIN_FLAGS = ["--lora-r", "4", "--target-modules", "q_proj", "v_proj", "lm_head", "--epochs", "60",
               "--lr", "2e-2", "--weight-decay", "1e-1", "--max-length", "128"]
ERASE_FLAGS = ["--damping", "0.01", "--tol", "1e-8", "--max-iters", "200"]
# sequential vs combined, relative to the combined update ‖θ_comb − θ̂‖
PARAMETER_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def erasures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    data = root / "train.jsonl"
    examples = toy_examples(16, seed=3)
    write_examples(data, examples)
    flip = {" Yes": " No", " No": " Yes"}
    first, second, both = root / "r1.jsonl", root / "r2.jsonl", root / "r12.jsonl"
    lines1 = ['{"op": "remove", "id": "ex1"}',
              json.dumps({"op": "correct_response", "id": "ex5", "response": flip[examples[5].response]})]
    lines2 = ['{"op": "remove", "id": "ex9"}',
              json.dumps({"op": "modify_query", "id": "ex2", "prompt": "Is 'sun moon star' nice?"})]
    first.write_text("\n".join(lines1) + "\n")
    second.write_text("\n".join(lines2) + "\n")
    both.write_text("\n".join(lines1 + lines2) + "\n")
    paths = {name: root / name for name in ("adapter", "erased1", "erased2", "combined", "retrained")}
    edited1 = root / "edited1.jsonl"
    steps = [
        ("train", "--model", "tiny", "--data", data, "--out", paths["adapter"], *TRAIN_FLAGS),
        ("erase", "--adapter", paths["adapter"], "--data", data, "--requests", first, "--out", paths["erased1"], *ERASE_FLAGS),
        ("apply-requests", "--data", data, "--requests", first, "--out", edited1),
        ("erase", "--adapter", paths["erased1"], "--data", edited1, "--requests", second, "--out", paths["erased2"],
         *ERASE_FLAGS),
        ("erase", "--adapter", paths["adapter"], "--data", data, "--requests", both, "--out", paths["combined"], *ERASE_FLAGS),
        ("retrain", "--like", paths["adapter"], "--data", data, "--requests", both, "--out", paths["retrained"]),
    ]
    for step in steps:
        done = cli(*step)
        assert done.code == 0, (step[0], done.err)
    return root, data, paths, edited1, first, second, both


def test_the_second_erase_uses_the_edited_set_recorded_by_the_first(erasures):
    root, data, paths, edited1, first, second, both = erasures
    entries = read_lineage(paths["erased2"])
    assert [e["command"] for e in entries] == ["train", "erase", "erase"]
    assert entries[2]["data_before_sha256"] == entries[1]["data_after_sha256"] == dataset_hash(read_examples(edited1))
    # the two steps end where the combined one does: the same edited training set
    assert entries[2]["data_after_sha256"] == read_lineage(paths["combined"])[1]["data_after_sha256"]
    assert entries[2]["n_examples_after"] == 14


def test_two_sequential_erasures_agree_with_one_combined_erasure(erasures):
    root, data, paths, *_ = erasures
    with one_thread():
        base, tokenizer = load_base_model("tiny")
        model = load_adapter(base, paths["adapter"])
        theta = AdapterParameters.of(model).flat()
        vectors = {name: adapter_vector(model, paths[name]) for name in ("erased2", "combined", "retrained")}
        sequential, combined, retrained = vectors["erased2"], vectors["combined"], vectors["retrained"]
        step = float((combined - theta).norm())
        gap = float((sequential - combined).norm())
        error = float((combined - retrained).norm())
        examples = read_examples(data)
        kl_gap = function_space_distance(model, tokenizer, examples, combined, sequential, 128, 8)["kl"]
        kl_error = function_space_distance(model, tokenizer, examples, retrained, combined, 128, 8)["kl"]
    print(f"\n‖θ_comb − θ̂‖ = {step:.4e}; ‖θ_seq − θ_comb‖ = {gap:.4e} ({gap / step:.2%}); "
          f"‖θ_comb − θ_retrain‖ = {error:.4e}; KL(comb‖seq) = {kl_gap:.3e}; KL(retrain‖comb) = {kl_error:.3e}")
    assert gap <= PARAMETER_TOLERANCE * step
    assert gap <= error
    assert kl_gap <= kl_error
    assert torch.isfinite(sequential).all()
