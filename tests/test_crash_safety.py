"""Crash safety: ``erase`` and ``train`` killed with SIGKILL at random moments and just before each step of
writing their outputs leave the target either absent or complete, the input adapter byte-identical, and
nothing that blocks a rerun (a stale temporary directory is removed by the next run)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import FAST_TRAIN, cli, digest
from conftest import toy_examples

from llmeraser.data import write_examples
from llmeraser.hashing import adapter_hash
from llmeraser.lineage import verify_adapter

RUNNER = Path(__file__).with_name("crash_runner.py")
ERASE_FILES = {"adapter_config.json", "adapter_model.safetensors", "llmeraser_training.json", "lineage.jsonl",
               "erasure_report.json"}
TRAIN_FILES = ERASE_FILES - {"erasure_report.json"}


def run_jobs(root: Path, jobs: list[dict]) -> dict[str, dict]:
    jobs_file, results_file = root / f"jobs-{jobs[0]['name']}.json", root / f"results-{jobs[0]['name']}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(RUNNER), str(jobs_file), str(results_file)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["name"]: r for r in json.loads(results_file.read_text())}


def temporaries(job_dir: Path, target: str) -> list[Path]:
    return [p for p in job_dir.iterdir() if p.name.startswith(f".{target}.tmp-")] if job_dir.exists() else []


def check_absent_or_complete(job_dir: Path, target: str, expected: set[str]) -> str:
    """'absent' or 'complete'; fails on a partial target or anything else left beside it."""
    out = job_dir / target
    leftovers = [p.name for p in job_dir.iterdir() if p.name != target and not p.name.startswith(f".{target}.tmp-")] \
        if job_dir.exists() else []
    assert leftovers == [], leftovers
    if not out.exists():
        return "absent"
    assert {p.name for p in out.iterdir()} >= expected, sorted(p.name for p in out.iterdir())
    entries, problems = verify_adapter(out)
    assert problems == [] and entries, problems
    if "erasure_report.json" in expected:
        report = json.loads((out / "erasure_report.json").read_text())
        assert report["output_adapter_sha256"] == adapter_hash(out)
    return "complete"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data, requests = root / "train.jsonl", root / "requests.jsonl"
    write_examples(data, toy_examples(10, seed=7))
    requests.write_text('{"op": "remove", "id": "ex3"}\n{"op": "correct_response", "id": "ex6", "response": " No"}\n')
    adapter = root / "adapter"
    assert cli("train", "--model", "tiny", "--data", data, "--out", adapter, *FAST_TRAIN).code == 0
    return root, data, requests, adapter


def erase_argv(setup, out: Path) -> list[str]:
    _, data, requests, adapter = setup
    return ["erase", "--adapter", str(adapter), "--data", str(data), "--requests", str(requests), "--out", str(out),
            "--damping", "0.1", "--max-iters", "3"]  # relative residual 0.04; each killed run computes up to its kill


def train_argv(setup, out: Path) -> list[str]:
    _, data, _, _ = setup
    return ["train", "--model", "tiny", "--data", str(data), "--out", str(out), *FAST_TRAIN]


def job(root: Path, name: str, command: str, argv_of, **kill) -> dict:
    job_dir = root / "outs" / name
    target = "erased" if command == "erase" else "adapter"
    return {"name": name, "argv": argv_of(job_dir / target), "watch": str(job_dir), "log": str(root / f"{name}.log"),
            **kill}


def kill_points(events: list[str]) -> list[int]:
    """1-based event numbers to kill at: the first, a spread over the writing, the rename and just after."""
    renames = [i + 1 for i, e in enumerate(events) if e.startswith("os.rename")]
    assert renames, events
    rename = renames[-1]
    picks = {1, 2, len(events) // 3, len(events) // 2, rename - 2, rename - 1, rename, rename + 1}
    return sorted(k for k in picks if 1 <= k <= len(events))


def test_sigkill_leaves_target_absent_or_complete_and_input_untouched(setup):
    root, data, requests, adapter = setup
    inputs_before = {"adapter": digest(adapter), "data": data.read_bytes(), "requests": requests.read_bytes()}
    argv = {"erase": lambda out: erase_argv(setup, out), "train": lambda out: train_argv(setup, out)}

    # 1. complete runs, recording every file-system event under each job's directory, and their wall time
    (root / "outs").mkdir(exist_ok=True)  # the same events in every run (no parent to create first)
    records = {c: root / f"events-{c}.json" for c in argv}
    reference = run_jobs(root, [job(root, f"{c}-reference", c, argv[c], record_events=str(records[c])) for c in argv])
    events = {c: json.loads(records[c].read_text()) for c in argv}
    for command in argv:
        assert reference[f"{command}-reference"].get("exit_code") == 0, (root / f"{command}-reference.log").read_text()

    # 2. kills: just before chosen write events, and at random moments of the whole run
    rng = random.Random(1234)
    jobs, reruns = [], {}
    for command in argv:
        for k in kill_points(events[command]):
            jobs.append(job(root, f"{command}-event{k}", command, argv[command], kill_at_event=k))
        wall = reference[f"{command}-reference"]["wall_s"]
        for i in range(3):
            jobs.append(job(root, f"{command}-time{i}", command, argv[command], kill_after_s=rng.uniform(0.05, wall)))
    # 3. reruns over what the kills just before the rename left (the target absent, a stale temporary)
    for command in argv:
        rename = [k for k in kill_points(events[command]) if events[command][k - 1].startswith("os.rename")][-1]
        killed = f"{command}-event{rename}"
        jobs.append({**job(root, f"{command}-rerun", command, argv[command]), "copy_from": str(root / "outs" / killed)})
        reruns[f"{command}-rerun"] = killed
    results = run_jobs(root, jobs)

    outcomes = {}
    for spec in jobs:
        name = spec["name"]
        if name in reruns:
            continue
        command = name.split("-")[0]
        result = results[name]
        target = "erased" if command == "erase" else "adapter"
        job_dir = root / "outs" / name
        if "signal" in result:
            assert result["signal"] == signal.SIGKILL
        else:
            assert result["exit_code"] == 0, (root / f"{name}.log").read_text()
        state = check_absent_or_complete(job_dir, target, ERASE_FILES if command == "erase" else TRAIN_FILES)
        outcomes[name] = (state, "killed" if "signal" in result else "finished", len(temporaries(job_dir, target)))

    # kills at the rename leave no target, kills after it a complete one
    for command in argv:
        rename = [i + 1 for i, e in enumerate(events[command]) if e.startswith("os.rename")][-1]
        assert outcomes[f"{command}-event{rename}"] == ("absent", "killed", 1)
        assert outcomes[f"{command}-event{rename + 1}"] == ("complete", "killed", 0)

    # the reruns succeeded over the stale temporary directories and removed them
    for rerun, killed in reruns.items():
        command = rerun.split("-")[0]
        target = "erased" if command == "erase" else "adapter"
        assert outcomes[killed][:2] == ("absent", "killed") and outcomes[killed][2] == 1, outcomes[killed]
        assert results[rerun].get("exit_code") == 0, (root / f"{rerun}.log").read_text()
        job_dir = root / "outs" / rerun
        assert check_absent_or_complete(job_dir, target, ERASE_FILES if command == "erase" else TRAIN_FILES) == "complete"
        assert temporaries(job_dir, target) == []

    assert digest(adapter) == inputs_before["adapter"]
    assert data.read_bytes() == inputs_before["data"] and requests.read_bytes() == inputs_before["requests"]
    killed_mid_write = [n for n, (state, how, tmp) in outcomes.items() if how == "killed" and tmp > 0]
    killed_after_rename = [n for n, (state, how, _) in outcomes.items() if how == "killed" and state == "complete"]
    assert any(n.startswith("erase") for n in killed_mid_write) and any(n.startswith("train") for n in killed_mid_write)
    assert killed_after_rename, outcomes
    print("\n".join(f"{name}: {outcome}" for name, outcome in sorted(outcomes.items())))


# ----------------------------------------------------------------------------- Ctrl-C and a full disk


def nothing_left(directory: Path, target: str) -> None:
    assert not (directory / target).exists()
    assert temporaries(directory, target) == []


@pytest.mark.parametrize("command", ["train", "erase"])
def test_ctrl_c_at_a_write_point_is_one_line_exit_130_and_nothing_written(setup, monkeypatch, tmp_path, command):
    import llmeraser.atomic

    def interrupted(directory: Path) -> None:  # everything written to the temporary directory, not yet renamed
        assert (directory / "adapter_model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(llmeraser.atomic, "fsync_tree", interrupted)
    before = digest(setup[3])
    argv = erase_argv(setup, tmp_path / "out") if command == "erase" else train_argv(setup, tmp_path / "out")
    done = cli(*argv)
    assert done.code == 130
    assert "Traceback" not in done.err
    assert done.err.strip().splitlines()[-1] == "llmeraser: interrupted (Ctrl-C); nothing was written"
    assert [line for line in done.err.splitlines() if line.startswith("llmeraser: interrupted")] == [
        "llmeraser: interrupted (Ctrl-C); nothing was written"]
    nothing_left(tmp_path, "out")
    assert digest(setup[3]) == before


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """While active, SIGINT is not ignored here, so that a child started now does not ignore it either. A shell
    starts background jobs (``bash scripts/test.sh &``) with SIGINT ignored, an ignored signal stays ignored
    across fork and exec, and the Ctrl-C below then never reached the child: it trained on to the timeout."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_to_a_running_train_subprocess(setup, tmp_path):
    """A real Ctrl-C (SIGINT) while ``llmeraser train`` runs: exit 130, one line, no traceback, nothing written."""
    _, data, _, _ = setup
    write_examples(tmp_path / "long.jsonl", toy_examples(40, seed=3))
    argv = [sys.executable, "-m", "llmeraser", "train", "--model", "tiny", "--data", str(tmp_path / "long.jsonl"),
            "--out", str(tmp_path / "out"), "--lora-r", "2", "--epochs", "10000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with sigint_not_ignored():
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert process.stderr is not None
        first = b""
        while b"train:" not in first:  # the progress bar ("train: ..."): training has started
            chunk = process.stderr.read1(256)  # type: ignore[attr-defined]
            assert chunk, "train exited before it started: " + first.decode()
            first += chunk
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    err = (first + rest).decode()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "llmeraser: interrupted (Ctrl-C); nothing was written"
    nothing_left(tmp_path, "out")


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_while_writing_is_one_line_exit_5_and_nothing_left(setup, monkeypatch, tmp_path, code, reason):
    import llmeraser.atomic

    def full(directory: Path) -> None:
        raise OSError(code, os.strerror(code), str(directory / "adapter_model.safetensors"))

    monkeypatch.setattr(llmeraser.atomic, "fsync_tree", full)
    done = cli(*train_argv(setup, tmp_path / "out"))
    assert done.code == 5
    lines = [line for line in done.err.splitlines() if line.startswith("llmeraser: error")]  # after the progress bar
    assert len(lines) == 1 and "Traceback" not in done.err and done.err.strip().endswith(lines[0]), done.err
    assert lines[0].startswith(f"llmeraser: error: {reason} while writing {tmp_path / 'out'} (it needs at least ")
    assert "bytes" in lines[0] and "free there" in lines[0] and "nothing was written" in lines[0]
    nothing_left(tmp_path, "out")


def test_full_disk_during_erase_names_the_output_and_the_weights_it_needed(setup, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    import llmeraser.atomic

    real_write = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs):  # the weights fit, the report does not
        if self.name == "erasure_report.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    done = cli(*erase_argv(setup, tmp_path / "erased"))
    monkeypatch.undo()
    weights = load_file(str(setup[3] / "adapter_model.safetensors"))
    needed = sum(t.numel() * t.element_size() for t in weights.values())
    assert done.code == 5, done.err
    assert f"no space left on device while writing {tmp_path / 'erased'} (it needs at least {needed:,} bytes" in done.err
    nothing_left(tmp_path, "erased")
    assert llmeraser.atomic.fsync_tree  # untouched


def test_full_disk_writing_a_results_file(setup, monkeypatch, tmp_path):
    """``evaluate --json``: the same exit 5, naming the file and the bytes it needed; no temporary left."""
    _, data, _, adapter = setup
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    done = cli("evaluate", "--adapter", adapter, "--data", data, "--json", tmp_path / "results.json")
    assert done.code == 5, done.err
    assert f"no space left on device while writing {tmp_path / 'results.json'} (it needs at least" in done.err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_the_rust_weights_writer_is_recognised(setup, monkeypatch, tmp_path):
    """safetensors writes the weights from Rust: a full disk there is a ``SafetensorError`` carrying
    ``(os error 28)``, not an ``OSError`` (as a real run on an 8 KiB tmpfs showed); the same exit 5."""
    import peft.peft_model
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as out:
            out.write(b"partial")  # a partial file, as the real writer leaves
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    done = cli(*train_argv(setup, tmp_path / "out"))
    assert done.code == 5, done.err
    assert f"llmeraser: error: no space left on device while writing {tmp_path / 'out'}" in done.err
    assert "Traceback" not in done.err
    nothing_left(tmp_path, "out")
