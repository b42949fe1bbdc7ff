"""Sequential erasure: erasing on top of an erased adapter (with the edited training set that its lineage
and training record name) agrees with one combined erasure of both request files.

Two Newton steps from θ̂ (the second from θ₁ over the edited set) and one step from θ̂ differ only by
the change of curvature and gradients along the first step (second order in the step). On the
well-conditioned recipe of the CLI tests (weight decay 0.1, trained to convergence) we require, in
function space, the difference to be a small fraction of the combined update's own distance to exact
retraining (sequential erasure adds much less error than the method itself has), and the edited examples'
losses to move alike.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import cli
from conftest import one_thread, toy_examples

from llmeraser.adapter import AdapterParameters, adapter_vector, load_adapter
from llmeraser.data import read_examples, write_examples
from llmeraser.evaluate import example_loss_values, function_space_distance
from llmeraser.hashing import dataset_hash
from llmeraser.lineage import read_lineage
from llmeraser.models import load_base_model
from llmeraser.requests import read_requests, resolve

TRAIN_FLAGS = ["--lora-r", "4", "--target-modules", "q_proj", "v_proj", "lm_head", "--epochs", "60",
               "--lr", "2e-2", "--weight-decay", "1e-1", "--max-length", "128"]
ERASE_FLAGS = ["--damping", "0.01", "--tol", "1e-8", "--max-iters", "200"]
# Tolerances, in function space (LoRA parameters are not identifiable, docs/method.md): the KL between the
# sequential and the combined adapters at most a quarter of the combined adapter's own KL to retraining;
# the changes of the edited examples' losses (old and new versions) within 25 % of the combined ones;
# the sequential adapter's KL to retraining within 1.5 times the combined one's.
# Measured: 0.11 and 0.08 of the KL, 10 % of the loss changes, 1.28 times.
KL_TOLERANCE = 0.25
LOSS_CHANGE_TOLERANCE = 0.25
RETRAIN_TOLERANCE = 1.5


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
    root, data, paths, edited1, first, second, both = erasures
    with one_thread():
        base, tokenizer = load_base_model("tiny")
        model = load_adapter(base, paths["adapter"])
        params = AdapterParameters.of(model)
        theta = params.flat()
        sequential, combined, retrained = (adapter_vector(model, paths[n]) for n in ("erased2", "combined", "retrained"))
        examples = read_examples(data)
        pairs = resolve(read_requests(both), examples)
        edited = [p.old for p in pairs] + [p.new for p in pairs if p.new is not None]

        def kl(a, b, on):
            return function_space_distance(model, tokenizer, on, a, b, 128, 8)

        def losses(vector):
            params.assign(vector)
            return torch.tensor(example_loss_values(model, tokenizer, edited, 128, 8), dtype=torch.float64)

        gap, error = kl(combined, sequential, examples), kl(retrained, combined, examples)
        seq_error = kl(retrained, sequential, examples)
        gap_edited, error_edited = kl(combined, sequential, edited), kl(retrained, combined, edited)
        before, after_sequential, after_combined = losses(theta), losses(sequential), losses(combined)
        params.assign(theta)
    change = (after_combined - before).norm()
    change_gap = float((after_sequential - after_combined).norm() / change)
    print(f"\nKL(combined ‖ sequential) = {gap['kl']:.2e} (training set), {gap_edited['kl']:.2e} (edited); "
          f"KL(retrained ‖ combined) = {error['kl']:.2e}, {error_edited['kl']:.2e}; edited-loss changes differ by "
          f"{change_gap:.1%}; KL(retrained ‖ sequential) = {seq_error['kl']:.2e}; ‖θ_seq − θ_comb‖ / ‖θ_comb − θ̂‖ = "
          f"{float((sequential - combined).norm() / (combined - theta).norm()):.2f} (LoRA is not identifiable)")
    assert gap["kl"] <= KL_TOLERANCE * error["kl"]
    assert gap_edited["kl"] <= KL_TOLERANCE * error_edited["kl"]
    assert gap["top1_agreement"] == 1.0
    assert change_gap <= LOSS_CHANGE_TOLERANCE
    assert seq_error["kl"] <= RETRAIN_TOLERANCE * error["kl"]
