"""Privacy and safety of the outputs: no output file, report, lineage or console message contains the text of
a removed or replaced example (nor of its replacement); weights are never unpickled; code shipped with a
checkpoint never runs unless the user passes --trust-remote-code."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from cli_helpers import FAST_TRAIN, cli
from safetensors.torch import load_file, save_file

from llmeraser.adapter import load_adapter
from llmeraser.data import Example, write_examples
from llmeraser.errors import InputError
from llmeraser.models import build_byte_tokenizer, load_base_model

SRC = Path(__file__).resolve().parents[1] / "src" / "llmeraser"

# Markers unlikely to occur anywhere by chance; the old texts must vanish from every output, and the new
# ones (given in the request file) must not be copied into reports either.
REMOVED_PROMPT, REMOVED_RESPONSE = "QZX-removed-prompt-4417", " QZX-removed-response-8812"
OLD_PROMPT, NEW_PROMPT = "QZX-old-prompt-2290", "QZX-new-prompt-5531"
OLD_RESPONSE, NEW_RESPONSE = " QZX-old-response-7034", " QZX-new-response-1168"
MARKERS = [m.strip() for m in (REMOVED_PROMPT, REMOVED_RESPONSE, OLD_PROMPT, NEW_PROMPT, OLD_RESPONSE, NEW_RESPONSE)]


def training_data() -> list[Example]:
    examples = [Example(f"u{i}", f"Is item {i} good for user {i % 3}?", " Yes" if i % 2 else " No") for i in range(10)]
    examples[2] = Example("u2", REMOVED_PROMPT, REMOVED_RESPONSE)
    examples[5] = Example("u5", OLD_PROMPT, " Yes")
    examples[7] = Example("u7", "Is item 7 good?", OLD_RESPONSE)
    return examples


def leaks(text: str) -> list[str]:
    """Markers found in ``text`` as written, JSON-escaped or with their leading space."""
    found = []
    for marker in MARKERS:
        forms = {marker, json.dumps(marker)[1:-1], marker.encode("unicode_escape").decode()}
        if any(form in text for form in forms):
            found.append(marker)
    return found


def test_no_output_or_message_contains_the_text_of_edited_examples(tmp_path):
    data, requests = tmp_path / "train.jsonl", tmp_path / "requests.jsonl"
    write_examples(data, training_data())
    requests.write_text(
        '{"op": "remove", "id": "u2"}\n'
        f'{{"op": "modify_query", "id": "u5", "prompt": "{NEW_PROMPT}"}}\n'
        f'{{"op": "correct_response", "id": "u7", "response": "{NEW_RESPONSE}"}}\n'
    )
    out = tmp_path / "out"
    runs = [
        cli("train", "--model", "tiny", "--data", data, "--out", out / "adapter", *FAST_TRAIN),
        cli("erase", "--adapter", out / "adapter", "--data", data, "--requests", requests, "--out", out / "erased",
            "--damping", "0.1"),
        cli("retrain", "--like", out / "adapter", "--data", data, "--requests", requests, "--out", out / "retrained"),
        cli("evaluate", "--adapter", out / "erased", "--data", data, "--requests", requests,
            "--compare", out / "retrained", out / "adapter", "--json", out / "eval.json"),
        cli("history", out / "erased"),
        cli("history", out / "erased", "--json"),
    ]
    for run in runs:
        assert run.code == 0, run.err
    # failures print messages too: a replacement too long for the context, a solve that fails and is
    # retried with more damping, an adapter with NaN weights
    long_request = tmp_path / "long.jsonl"
    long_request.write_text(f'{{"op": "correct_response", "id": "u7", "response": "{NEW_RESPONSE * 20}"}}\n')
    nan_adapter = out / "nan-adapter"
    shutil.copytree(out / "adapter", nan_adapter)
    weights = load_file(nan_adapter / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, nan_adapter / "adapter_model.safetensors")
    others = [
        cli("erase", "--adapter", out / "adapter", "--data", data, "--requests", long_request, "--out", out / "x1",
            "--max-length", "64"),
        cli("erase", "--adapter", out / "adapter", "--data", data, "--requests", requests, "--out", out / "x2",
            "--damping", "0", "--curvature", "hessian", "--auto-damping", "--max-iters", "10"),
        cli("erase", "--adapter", nan_adapter, "--data", data, "--requests", requests, "--out", out / "x3",
            "--allow-mismatch"),
    ]
    assert others[0].code == 3 and f"{long_request}:1:" in others[0].err and "response is" in others[0].err
    assert others[1].code in (0, 4)
    assert others[2].code == 4 and "stage 'adapter'" in others[2].err
    runs += others
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 20
    assert {"erasure_report.json", "lineage.jsonl", "llmeraser_training.json", "eval.json"} <= {p.name for p in files}
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert not leaks(text), (path, leaks(text))
    for run in runs:
        assert not leaks(run.out) and not leaks(run.err), (leaks(run.out), leaks(run.err))


def test_the_edited_training_set_keeps_only_the_replacement_texts(tmp_path):
    data, requests, edited = tmp_path / "train.jsonl", tmp_path / "r.jsonl", tmp_path / "edited.jsonl"
    write_examples(data, training_data())
    requests.write_text('{"op": "remove", "id": "u2"}\n'
                        f'{{"op": "modify_query", "id": "u5", "prompt": "{NEW_PROMPT}"}}\n')
    assert cli("apply-requests", "--data", data, "--requests", requests, "--out", edited).code == 0
    text = edited.read_text()
    assert REMOVED_PROMPT not in text and REMOVED_RESPONSE.strip() not in text and OLD_PROMPT not in text
    assert NEW_PROMPT in text


class _Trap:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_never_unpickled(tmp_path):
    proof = tmp_path / "UNPICKLED"
    model_dir = tmp_path / "base"
    base, tokenizer = load_base_model("tiny")
    base.config.save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"trap": _Trap(str(proof))}))
    with pytest.raises(InputError, match="cannot load base model"):
        load_base_model(str(model_dir))
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps({"trap": _Trap(str(proof))}))
    with pytest.raises(InputError, match="adapter_model.safetensors"):
        load_adapter(base, adapter_dir)
    write_examples(tmp_path / "d.jsonl", [Example("a", "p", " r"), Example("b", "q", " s")])
    (tmp_path / "r.jsonl").write_text('{"op": "remove", "id": "a"}\n')
    done = cli("erase", "--model", "tiny", "--adapter", adapter_dir, "--data", tmp_path / "d.jsonl",
               "--requests", tmp_path / "r.jsonl", "--out", tmp_path / "o")
    assert done.code == 3 and "no adapter_model.safetensors" in done.err
    assert not proof.exists()


def test_remote_code_runs_only_when_trusted(tmp_path):
    proof = tmp_path / "REMOTE_CODE_RAN"
    model_dir = tmp_path / "custom"
    build_byte_tokenizer().save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "qzx_custom",
        "auto_map": {"AutoConfig": "configuration_qzx.QzxConfig", "AutoModelForCausalLM": "modeling_qzx.QzxModel"},
    }))
    code = f"from pathlib import Path\nPath({str(proof)!r}).write_text('ran')\n"
    for name in ("configuration_qzx.py", "modeling_qzx.py"):
        (model_dir / name).write_text(code)
    with pytest.raises(InputError, match="cannot load base model .* contains custom code"):
        load_base_model(str(model_dir))
    assert not proof.exists()
    with pytest.raises(Exception):  # noqa: B017 trusted: the shipped code runs (and here defines no model)
        load_base_model(str(model_dir), trust_remote_code=True)
    assert proof.exists()


def test_the_source_never_unpickles_nor_trusts_remote_code_by_default():
    forbidden = [r"\btorch\.load\(", r"\bpickle\.loads?\(", r"weights_only\s*=\s*False", r"use_safetensors\s*=\s*False",
                 r"safe_serialization\s*=\s*False", r"trust_remote_code\s*=\s*True"]
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in forbidden:
            assert not re.search(pattern, text), (path, pattern)
