"""Every kind of bad input, through the command line: what the user sees and the exit code (2 usage,
3 input, 4 numerical), and that nothing is written. ``python tests/test_bad_inputs.py`` prints the table
of docs/failures.md ("What the user sees for each bad input") from a real run of these cases."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import FAST_TRAIN, cli, digest  # noqa: E402
from conftest import toy_examples  # noqa: E402

from llmeraser.data import write_examples  # noqa: E402

GOOD = '{"op": "remove", "id": "ex0"}\n'


@dataclass
class Case:
    what: str  # the bad input, as the user would describe it
    setup: Callable[[Path], list[str]]  # writes its files under the work directory, returns argv
    code: int
    expected: str  # a fragment of the message
    patch: Callable[[], Any] | None = None  # a context manager active during the run (a simulated failure)


def requests_file(root: Path, content: bytes | str, name: str = "req.jsonl") -> str:
    path = root / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return name


def erase(requests: str, *extra: str, data: str = "train.jsonl", adapter: str = "adapter", out: str = "out") -> list[str]:
    return ["erase", "--adapter", adapter, "--data", data, "--requests", requests, "--out", out, "--damping", "0.1",
            *extra]


def with_request_line(line: str | bytes, name: str = "req.jsonl") -> Callable[[Path], list[str]]:
    raw = line.encode("utf-8") if isinstance(line, str) else line
    return lambda root: erase(requests_file(root, GOOD.encode() + raw + b"\n", name))


def data_file(root: Path, content: str, name: str = "bad-train.jsonl") -> str:
    (root / name).write_text(content, encoding="utf-8")
    return name


def parquet_file(root: Path, rows: list[dict], name: str = "bad-train.parquet") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), root / name)
    return name


CHAT_CELL = '"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Yo""}]"'


def failing_write(error: BaseException) -> Callable[[], Any]:
    """The output's last step before its rename (everything written to the temporary directory) raises."""
    from unittest import mock

    return lambda: mock.patch("llmeraser.atomic.fsync_tree", side_effect=error)


def nan_adapter(root: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "adapter", root / "nan-adapter", dirs_exist_ok=True)
    weights = load_file(root / "nan-adapter" / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, root / "nan-adapter" / "adapter_model.safetensors")
    return erase(requests_file(root, GOOD), "--allow-mismatch", adapter="nan-adapter")


def big_file(root: Path) -> list[str]:
    lines = [GOOD.strip(), '{"op": "remove", "id": "ex1"'] + ['{"op": "remove", "id": "ex2"}'] * 400_000
    return erase(requests_file(root, "\n".join(lines) + "\n", "big.jsonl"))


def pickle_only_adapter(root: Path) -> list[str]:
    (root / "pickled").mkdir(exist_ok=True)
    shutil.copy(root / "adapter" / "adapter_config.json", root / "pickled" / "adapter_config.json")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    return erase(requests_file(root, GOOD), "--model", "tiny", adapter="pickled")


def tampered_lineage(root: Path) -> list[str]:
    shutil.copytree(root / "adapter", root / "tampered", dirs_exist_ok=True)
    path = root / "tampered" / "lineage.jsonl"
    entry = json.loads(path.read_text())
    entry["n_examples_after"] = 9
    path.write_text(json.dumps(entry) + "\n")
    return ["history", "tampered"]


def saved_base(root: Path, name: str, **tiny: int) -> str:
    """A tiny base model written by ``save_pretrained`` (``build_tiny_model(**tiny)``)."""
    from llmeraser.models import build_tiny_model

    if not (root / name).is_dir():
        model, tokenizer = build_tiny_model(**tiny)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return name


def peft_adapter(root: Path) -> str:
    """An adapter written by PEFT itself: no llmeraser training record."""
    from peft import LoraConfig, get_peft_model

    from llmeraser.models import load_base_model

    if not (root / "peft-adapter").is_dir():
        model = get_peft_model(load_base_model("tiny")[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        model.save_pretrained(root / "peft-adapter")
    return "peft-adapter"


CASES = [
    # request files
    Case("malformed JSON", with_request_line('{"op": "remove", "id": "ex1"'), 3,
         "req.jsonl:2: malformed JSON: Expecting ',' delimiter (column 29)"),
    Case("a line that is not an object", with_request_line('["remove", "ex1"]'), 3,
         "req.jsonl:2: expected a JSON object, got list"),
    Case("wrong type (id is a list)", with_request_line('{"op": "remove", "id": ["ex1"]}'), 3,
         "req.jsonl:2: field 'id' must be a string, got list"),
    Case("wrong type (prompt is a number)", with_request_line('{"op": "modify_query", "id": "ex1", "prompt": 5}'), 3,
         "req.jsonl:2: field 'prompt' must be a string, got int"),
    Case("unknown op", with_request_line('{"op": "delete", "id": "ex1"}'), 3,
         "req.jsonl:2: unknown op 'delete' (expected one of: remove, modify_query, correct_response)"),
    Case("missing field", with_request_line('{"op": "correct_response", "id": "ex1"}'), 3,
         "req.jsonl:2: missing field 'response'"),
    Case("empty field", with_request_line('{"op": "modify_query", "id": "ex1", "prompt": "  "}'), 3,
         "req.jsonl:2: field 'prompt' is empty"),
    Case("field that does not belong to the op", with_request_line('{"op": "remove", "id": "ex1", "response": "x"}'), 3,
         "req.jsonl:2: unexpected field(s) for op 'remove': response"),
    Case("the same key twice in one line", with_request_line('{"op": "remove", "id": "ex1", "id": "ex2"}'), 3,
         "req.jsonl:2: duplicate key 'id' in one object"),
    Case("id not in the training data", with_request_line('{"op": "remove", "id": "ex99"}'), 3,
         "req.jsonl:2: id 'ex99' is not in the training data"),
    Case("the same id in two requests", with_request_line('{"op": "correct_response", "id": "ex0", "response": " No"}'), 3,
         "req.jsonl:2: duplicate id 'ex0' (already requested on line 1)"),
    Case("empty request file", lambda root: erase(requests_file(root, b"")), 3, "req.jsonl: no requests in file"),
    Case("request file of blank lines", lambda root: erase(requests_file(root, "\n  \r\n\n")), 3,
         "req.jsonl: no requests in file"),
    Case("requests that remove every example",
         lambda root: erase(requests_file(root, "".join(f'{{"op": "remove", "id": "ex{i}"}}\n' for i in range(10)))), 3,
         "req.jsonl: the requests would remove every training example (10 of 10)"),
    Case("non-UTF-8 bytes", with_request_line(b'{"op": "remove", "id": "ex\xff"}'), 3, "req.jsonl:2: not valid UTF-8 (byte 26)"),
    Case("an unpaired surrogate escape", with_request_line('{"op": "modify_query", "id": "ex1", "prompt": "a\\ud800"}'), 3,
         "req.jsonl:2: field 'prompt' contains an unpaired surrogate escape"),
    Case("replacement response longer than the context",
         with_request_line(json.dumps({"op": "correct_response", "id": "ex1", "response": "no " * 60})), 3,
         "req.jsonl:2: example 'ex1': response is 181 tokens, max_length is 128"),
    Case("request file not found", lambda root: erase("missing.jsonl"), 3, "missing.jsonl: file not found"),
    Case("very large request file (400,000 lines, 12 MB) with an error on line 2", big_file, 3,
         "big.jsonl:2: malformed JSON"),
    Case("UTF-8 BOM and CRLF line ends (accepted)",
         lambda root: erase(requests_file(root, b'\xef\xbb\xbf{"op": "remove", "id": "ex0"}\r\n'
                                                 b'{"op": "remove", "id": "ex1"}\r\n'),
                            out="bom-out"), 0, "erased adapter written to bom-out"),
    # training data
    Case("training data: duplicate id", lambda root: erase(requests_file(root, GOOD), data=data_file(
        root, '{"id": "a", "prompt": "p", "response": " r"}\n{"id": "a", "prompt": "q", "response": " s"}\n')), 3,
        "bad-train.jsonl:2: duplicate id 'a' (first seen on line 1)"),
    Case("training data: missing response", lambda root: erase(requests_file(root, GOOD), data=data_file(
        root, '{"id": "ex0", "prompt": "p"}\n')), 3, "bad-train.jsonl:1: missing field 'response'"),
    Case("training data: response longer than the context", lambda root: erase(
        requests_file(root, '{"op": "remove", "id": "ex1"}\n'), "--allow-mismatch", data=data_file(
            root, "".join(json.dumps({"id": f"ex{i}", "prompt": "p", "response": " r" * (70 if i == 3 else 1)}) + "\n"
                          for i in range(5)))), 3,
        "bad-train.jsonl:4: example 'ex3': response is 141 tokens, max_length is 128"),
    Case("training data: a CSV row with more fields than the header", lambda root: erase(
        requests_file(root, GOOD),
        data=data_file(root, "id,prompt,response\nex0,p, r\nex1,p, r, and more\n", "bad-train.csv")), 3,
        "bad-train.csv:3: expected 3 fields (as the header: id, prompt, response), got 4"),
    Case("training data: a CSV conversation whose messages cell is not JSON", lambda root: erase(
        requests_file(root, GOOD), data=data_file(root, f"id,messages\nex0,{CHAT_CELL}\nex1,[{{role: user}}]\n",
                                                  "bad-chat.csv")), 3,
        "bad-chat.csv:3: field 'messages' is not valid JSON (Expecting property name enclosed in double quotes"),
    Case("training data: Parquet without the needed columns", lambda root: erase(requests_file(root, GOOD), data=parquet_file(
        root, [{"id": "ex0", "question": "p", "answer": " r"}])), 3,
        "bad-train.parquet: missing column 'prompt' (or 'instruction' in the Alpaca layout, or 'messages'); "
        "the columns are: id, question, answer"),
    Case("training data: a Parquet row with a null prompt", lambda root: erase(requests_file(root, GOOD), data=parquet_file(
        root, [{"id": "ex0", "prompt": "p", "response": " r"}, {"id": "ex1", "prompt": None, "response": " r"}])), 3,
        "bad-train.parquet: row 1: field 'prompt' must be a string, got NoneType"),
    Case("training data is a directory", lambda root: erase(requests_file(root, GOOD), data="."), 3,
         ".: is a directory, expected a JSONL file"),
    Case("training data not the adapter's", lambda root: erase(requests_file(root, GOOD), data=data_file(
        root, "".join(json.dumps(e.to_json()) + "\n" for e in toy_examples(10, seed=99)))), 3,
        "is not the data the adapter was trained on"),
    # adapters, outputs, lineage
    Case("adapter directory not found", lambda root: erase(requests_file(root, GOOD), adapter="nowhere"), 3,
         "nowhere: adapter directory not found"),
    Case("adapter weights only as a pickle (adapter_model.bin)", pickle_only_adapter, 3,
         "pickled: not a PEFT adapter directory with safetensors weights (no adapter_model.safetensors)"),
    Case("output directory exists", lambda root: erase(requests_file(root, GOOD), out="adapter"), 3,
         "adapter: output directory already exists"),
    Case("output inside the input adapter", lambda root: erase(requests_file(root, GOOD), out="adapter/sub"), 3,
         "--out may not be inside --adapter"),
    # base models and outside adapters
    Case("base model of the same shapes, other weights",
         lambda root: erase(requests_file(root, GOOD), "--model", saved_base(root, "other-base", seed=7)), 3,
         "the base model is not the one the adapter was trained on (recorded: 'tiny'; they differ in the input "
         "embeddings, the q_proj weights, the v_proj weights)"),
    Case("base model of other shapes",
         lambda root: erase(requests_file(root, GOOD), "--model", saved_base(root, "wide-base", hidden_size=64)), 3,
         "the base model's weights do not fit the adapter: model.layers.0.self_attn.q_proj.weight is (64, 64) in "
         "the base model"),
    Case("adapter trained outside llmeraser, recipe values not given",
         lambda root: erase(requests_file(root, GOOD), adapter=peft_adapter(root)), 3,
         "the adapter has no llmeraser training record (it was trained outside llmeraser), so the recipe values the "
         "erasure depends on are unknown: pass --weight-decay, --max-length, --loss-scope"),
    Case("tampered lineage", tampered_lineage, 3, "entry #0 (line 1): its content does not match its entry_sha256"),
    Case("--max-length beyond the model's context", lambda root: erase(requests_file(root, GOOD), "--max-length", "5000"), 3,
         "max_length 5000 (--max-length) exceeds the model's context window (max_position_embeddings = 1024)"),
    Case("disk full while writing the output (ENOSPC, simulated at the write)", lambda root: erase(requests_file(root, GOOD)),
         5, "no space left on device while writing out (it needs at least",
         failing_write(OSError(errno.ENOSPC, "No space left on device"))),
    Case("Ctrl-C while writing the output (simulated at the write)", lambda root: erase(requests_file(root, GOOD)),
         130, "llmeraser: interrupted (Ctrl-C); nothing was written", failing_write(KeyboardInterrupt())),
    # usage
    Case("negative damping", lambda root: [*erase(requests_file(root, GOOD)), "--damping", "-1"], 2,
         "--damping must be >= 0, got -1.0"),
    Case("unknown solver", lambda root: [*erase(requests_file(root, GOOD)), "--solver", "newton"], 2,
         "argument --solver: invalid choice: 'newton'"),
    Case("missing --requests", lambda root: ["erase", "--adapter", "adapter", "--data", "train.jsonl", "--out", "o"], 2,
         "the following arguments are required: --requests"),
    # numerical
    Case("NaN in the adapter's weights", nan_adapter, 4, "stage 'adapter': the input adapter's weights contain NaN or Inf"),
    Case("exact Hessian, no damping: CG meets negative curvature",
         lambda root: [*erase(requests_file(root, GOOD)), "--curvature", "hessian", "--damping", "0"], 4,
         "stage 'solve': cg non-positive curvature"),
    Case("the same from λ = 0.01 with --auto-damping (succeeds; every λ tried is in the report and the lineage)",
         lambda root: [*erase(requests_file(root, GOOD), out="auto-out"), "--curvature", "hessian", "--damping", "0.01",
                       "--auto-damping"], 0, "auto-damping: λ = 0.01 (failed)"),
]


def make_workdir(root: Path) -> Path:
    write_examples(root / "train.jsonl", toy_examples(10, seed=11))
    assert cli("train", "--model", "tiny", "--data", root / "train.jsonl", "--out", root / "adapter", *FAST_TRAIN).code == 0
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("bad-inputs"))


def run_case(root: Path, case: Case):
    previous = os.getcwd()
    os.chdir(root)
    try:
        argv = case.setup(root)
        start = time.perf_counter()
        with case.patch() if case.patch else contextlib.nullcontext():
            done = cli(*argv)
        return done, time.perf_counter() - start
    finally:
        os.chdir(previous)


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_a_clear_message_and_exit_code_and_nothing_is_written(workdir, case):
    before = digest(workdir / "adapter")
    done, seconds = run_case(workdir, case)
    message = done.err if done.code else done.out
    assert done.code == case.code, (done.code, done.err)
    assert case.expected in message, message
    assert "Traceback" not in done.err
    if done.code:
        assert not (workdir / "out").exists()
        assert not [p for p in workdir.iterdir() if p.name.startswith(".out.tmp")]
    assert digest(workdir / "adapter") == before
    if "very large" in case.what:
        assert seconds < 2.0  # streamed: stops at line 2, never reads the rest
    if "--auto-damping" in case.what:
        from llmeraser.lineage import read_lineage

        report = json.loads((workdir / "auto-out" / "erasure_report.json").read_text())
        tried = [a["damping"] for a in report["damping_attempts"]]
        assert tried == pytest.approx([0.01, 0.1, 1.0, 10.0]) and report["damping_used"] == pytest.approx(10.0)
        assert read_lineage(workdir / "auto-out")[-1]["result"]["damping_attempts"] == report["damping_attempts"]


def user_message(done, case: Case) -> str:
    """The message as the user reads it: on failure the ``llmeraser`` line and its continuation lines, on
    success the line the case is about."""
    text = done.err if done.code else done.out
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("usage:")]
    if done.code == 0:
        message = next((line for line in lines if case.expected in line), lines[-1])
    else:
        start = next((i for i, line in enumerate(lines) if line.startswith("llmeraser") and ": warning: " not in line), 0)
        message = " ".join(lines[start:])
    return message.replace("|", "\\|")


if __name__ == "__main__":  # the table of docs/failures.md from a real run
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = make_workdir(Path(tmp))
        print("| bad input | what the user sees (stderr) | exit |")
        print("|---|---|---|")
        for case in CASES:
            done, _ = run_case(root, case)
            print(f"| {case.what} | `{user_message(done, case)}` | {done.code} |")
