"""The console script end to end on the tiny model: train → erase, and refusals that write nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import toy_examples
from llmeraser.data import write_examples
from llmeraser.model import AdapterParameters, load_base_model

SCRIPT = Path(sys.executable).with_name("llmeraser")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    write_examples(data, toy_examples(12, seed=5))
    adapter = root / "adapter"
    done = run("train", "--model", "tiny", "--data", str(data), "--out", str(adapter), "--lora-r", "2",
               "--epochs", "3", "--lr", "1e-2", "--weight-decay", "1e-2")
    assert done.returncode == 0, done.stderr
    return root, data, adapter


def test_erase_writes_a_loadable_new_adapter_and_never_touches_the_input(trained_adapter):
    from peft import PeftModel

    root, data, adapter = trained_adapter
    requests = root / "requests.jsonl"
    requests.write_text(
        '{"op": "remove", "id": "ex1"}\n'
        '{"op": "modify_query", "id": "ex2", "prompt": "Is \'sun moon star\' nice?"}\n'
        '{"op": "correct_response", "id": "ex3", "response": " Maybe"}\n'
    )
    before = digest(adapter)
    out = root / "erased"
    done = run("erase", "--model", "tiny", "--adapter", str(adapter), "--data", str(data),
               "--requests", str(requests), "--out", str(out), "--damping", "0.1")
    assert done.returncode == 0, done.stderr
    assert digest(adapter) == before
    report = json.loads((out / "erasure_report.json").read_text())
    assert report["requests"] == {"remove": 1, "modify_query": 1, "correct_response": 1}
    assert report["config"]["weight_decay"] == pytest.approx(1e-2)  # read from the adapter's recipe
    for key in ("b_norm", "update_norm", "solver", "timings_s", "peak_memory_mb", "versions"):
        assert key in report
    base, _ = load_base_model("tiny")
    loaded = PeftModel.from_pretrained(base, str(out))
    theta_new = torch.cat([p.detach().reshape(-1) for n, p in loaded.named_parameters() if "lora_" in n])
    base2, _ = load_base_model("tiny")
    theta_old = AdapterParameters.of(PeftModel.from_pretrained(base2, str(adapter), is_trainable=True)).flat()
    assert float((theta_new - theta_old).norm()) == pytest.approx(report["update_norm"], rel=1e-4)


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
def test_bad_request_file_names_file_line_and_problem_and_writes_nothing(trained_adapter, line, problem):
    root, data, adapter = trained_adapter
    requests = root / "bad.jsonl"
    requests.write_text('{"op": "remove", "id": "ex0"}\n' + line + "\n")
    out = root / "never"
    done = run("erase", "--model", "tiny", "--adapter", str(adapter), "--data", str(data),
               "--requests", str(requests), "--out", str(out))
    assert done.returncode == 3
    assert f"{requests}:2:" in done.stderr and problem in done.stderr
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in root.iterdir())
