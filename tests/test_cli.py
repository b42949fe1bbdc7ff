"""The console script end to end on the tiny model (train → erase → retrain → evaluate --compare), and
the refusals: bad request files, mismatched base model or data, existing output directories (these through
``cli``, the console script's ``main`` in this process, as in test_bad_inputs: the same exit codes and
messages without an interpreter's start-up, ~8 s, for each)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from conftest import toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.data import write_examples
from llmeraser.models import build_tiny_model, load_base_model

SCRIPT = Path(sys.executable).with_name("llmeraser")
# linear lr decay: the final iterate close to a minimum. With a constant lr the last mini-batches decide
# where Adam stops, and the paired retrain (same batches, edits in place) ended further from the original on
# the corrected examples than any update did (one retrain is then no reference: see the bench's yardstick)
TRAIN_FLAGS = ["--lora-r", "4", "--target-modules", "q_proj", "v_proj", "lm_head", "--epochs", "60",
               "--lr", "2e-2", "--weight-decay", "1e-1", "--max-length", "128", "--lr-schedule", "linear"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """train → erase (all three kinds) → retrain, through the console script.

    The recipe trains to convergence with enough weight decay that the model does not interpolate its
    training data: the regime where the influence (Newton) step is accurate. (Trained to ~0 loss, the
    Gauss–Newton curvature vanishes and the step overshoots; see docs/method.md.)"""
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    examples = toy_examples(16, seed=3)
    write_examples(data, examples)
    requests = root / "requests.jsonl"
    flipped = " No" if examples[5].response == " Yes" else " Yes"
    requests.write_text(
        '{"op": "remove", "id": "ex1"}\n'
        '{"op": "modify_query", "id": "ex2", "prompt": "Is \'sun moon star\' nice?"}\n'
        f'{{"op": "correct_response", "id": "ex5", "response": "{flipped}"}}\n'
    )
    adapter, erased, retrained = root / "adapter", root / "erased", root / "retrained"
    done = run("train", "--model", "tiny", "--data", str(data), "--out", str(adapter), *TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr
    before = digest(adapter)
    done = run("erase", "--adapter", str(adapter), "--data", str(data), "--requests", str(requests),
               "--out", str(erased), "--damping", "0.01")
    assert done.returncode == 0, done.stderr
    assert str(erased) in done.stdout
    done = run("retrain", "--like", str(adapter), "--data", str(data), "--requests", str(requests), "--out", str(retrained))
    assert done.returncode == 0, done.stderr
    return root, data, requests, adapter, erased, retrained, before


def test_input_adapter_is_byte_identical(workflow):
    _, _, _, adapter, _, _, before = workflow
    assert digest(adapter) == before


def test_erased_adapter_loads_with_peft_and_report_has_its_fields(workflow):
    from peft import PeftModel

    _, _, _, adapter, erased, _, _ = workflow
    report = json.loads((erased / "erasure_report.json").read_text())
    assert report["requests"] == {"remove": 1, "modify_query": 1, "correct_response": 1}
    assert report["config"]["weight_decay"] == pytest.approx(1e-1)  # read from the training record
    assert len(report["affected_examples"]) == 3
    assert report["affected_examples"][0]["new_sha256"] is None  # a removal has no new version
    for key in ("b_norm", "update_norm", "solver", "timings_s", "peak_memory_mb", "versions",
                "input_adapter_sha256", "output_adapter_sha256", "requests_file_sha256"):
        assert key in report, key
    base, _ = load_base_model("tiny")
    loaded = PeftModel.from_pretrained(base, str(erased))
    theta_new = torch.cat([p.detach().reshape(-1) for n, p in loaded.named_parameters() if "lora_" in n])
    base2, _ = load_base_model("tiny")
    theta_old = AdapterParameters.of(PeftModel.from_pretrained(base2, str(adapter), is_trainable=True)).flat()
    assert float((theta_new - theta_old).norm()) == pytest.approx(report["update_norm"], rel=1e-4)


def test_erased_is_closer_to_retrained_than_original_on_edited_examples(workflow):
    root, data, requests, adapter, erased, retrained, _ = workflow
    out = {}
    for name, directory in (("original", adapter), ("erased", erased)):
        result = root / f"eval-{name}.json"
        done = run("evaluate", "--adapter", str(directory), "--data", str(data), "--requests", str(requests),
                   "--compare", str(retrained), "--json", str(result))
        assert done.returncode == 0, done.stderr
        assert "function-space distance" in done.stdout
        out[name] = json.loads(result.read_text())
    for key in ("data", "edited_old", "edited_new"):
        kl_original = out["original"]["compare"][0][key]["kl"]
        kl_erased = out["erased"]["compare"][0][key]["kl"]
        assert kl_erased < kl_original, (key, kl_erased, kl_original)
    metrics = out["original"]["data_metrics"]
    assert {"mean_loss", "perplexity", "accuracy", "auc"} <= set(metrics)
    assert len(out["original"]["edited_examples"]) == 3


def test_wrong_base_model_or_data_is_refused_unless_allowed(workflow):
    root, data, requests, adapter, _, _, _ = workflow
    other = root / "other.jsonl"
    write_examples(other, toy_examples(16, seed=4))
    done = cli("erase", "--adapter", str(adapter), "--data", str(other), "--requests", str(requests), "--out", str(root / "x1"))
    assert done.code == 3 and "is not the data the adapter was trained on" in done.err
    assert not (root / "x1").exists()
    other_base = root / "other-base"  # a different base model (same architecture, other weights)
    model, tokenizer = build_tiny_model(seed=7)
    model.save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    done = cli("erase", "--model", str(other_base), "--adapter", str(adapter), "--data", str(data),
               "--requests", str(requests), "--out", str(root / "x2"))
    assert done.code == 3 and "not the one the adapter was trained on" in done.err
    assert not (root / "x2").exists()
    (root / "cfg.toml").write_text('[erase]\ndamping = 0.1\nmax-iters = 5\n')
    done = cli("erase", "--config", str(root / "cfg.toml"), "--adapter", str(adapter), "--data", str(other),
               "--requests", str(requests.parent / "remove-only.jsonl"), "--out", str(root / "x3"))
    assert done.code == 3  # the request file is missing: an input error naming it
    assert "remove-only.jsonl" in done.err


def test_mismatched_data_allowed_knowingly(workflow):
    root, _, _, adapter, _, _, _ = workflow
    other = root / "other2.jsonl"
    write_examples(other, toy_examples(16, seed=4))
    only = root / "remove-ex0.jsonl"
    only.write_text('{"op": "remove", "id": "ex0"}\n')
    (root / "cfg2.toml").write_text('[erase]\ndamping = 0.1\nmax-iters = 5\n')
    out = root / "x4"
    done = cli("erase", "--config", str(root / "cfg2.toml"), "--adapter", str(adapter), "--data", str(other),
               "--requests", str(only), "--out", str(out), "--allow-mismatch")
    assert done.code == 0, done.err
    report = json.loads((out / "erasure_report.json").read_text())
    assert report["config"]["damping"] == 0.1 and report["config"]["max_iters"] == 5  # from the TOML file
    assert report["mismatches_allowed"] and "is not the data" in report["mismatches_allowed"][0]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"op": "remove", "id": "nope"}', "id 'nope' is not in the training data"),
        ('{"op": "delete", "id": "ex1"}', "unknown op 'delete'"),
        ('{"op": "modify_query", "id": "ex1"}', "missing field 'prompt'"),
        ('{"op": "remove", "id": "ex1"', "malformed JSON"),
        ('{"op": "remove", "id": "ex0"}', "duplicate id 'ex0'"),
    ],
)
def test_bad_request_file_names_file_line_and_problem_and_writes_nothing(workflow, line, problem):
    root, data, _, adapter, _, _, _ = workflow
    requests = root / "bad.jsonl"
    requests.write_text('{"op": "remove", "id": "ex0"}\n' + line + "\n")
    out = root / "never"
    done = cli("erase", "--adapter", str(adapter), "--data", str(data), "--requests", str(requests), "--out", str(out))
    assert done.code == 3
    assert f"{requests}:2:" in done.err and problem in done.err
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in root.iterdir())


def test_help_documents_every_flag_with_default():
    done = run("erase", "--help")
    assert done.returncode == 0
    for flag in ("--solver", "--curvature", "--damping", "--scaling", "--max-iters", "--tol", "--config"):
        assert flag in done.stdout
    assert "(default: cg)" in done.stdout
