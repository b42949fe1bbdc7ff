"""``--dry-run`` of ``train``, ``erase`` and ``fit-curvature``: the estimate from timed probe steps is within a factor of 2 of
the real run's wall time on the tiny model, and a dry run writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import cli
from conftest import toy_examples

from llmeraser.data import TokenizedExample, write_examples
from llmeraser.estimate import BatchCost, ProbeSettings, RunEstimate, StageEstimate, fit_batch_cost

# Long enough (a few seconds each) that timing noise on a shared 2-core machine stays small.
TRAIN = ["--model", "tiny", "--lora-r", "4", "--target-modules", "q_proj", "v_proj", "--epochs", "40",
         "--lr", "1e-2", "--weight-decay", "0.1", "--max-length", "128", "--batch-size", "8"]
ERASE = ["--solver", "cg", "--damping", "1e-3", "--max-iters", "20", "--tol", "1e-30", "--batch-size", "8"]


def script(*args) -> subprocess.CompletedProcess:
    """The console script in a fresh single-threaded process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("llmeraser")), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def stage_seconds(table: str) -> dict[str, float]:
    """{stage: seconds} from the printed dry-run table."""
    rows = {}
    for line in table.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}(\d+\.\d+)\s+(\d+)(\s|$)", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    return rows


def within_factor_2(estimate: float, real: float) -> float:
    ratio = estimate / real
    assert 0.5 <= ratio <= 2.0, f"estimate {estimate:.3f} s vs real {real:.3f} s (ratio {ratio:.2f})"
    return ratio


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    write_examples(root / "train.jsonl", toy_examples(64, seed=1))
    (root / "requests.jsonl").write_text(
        '{"op": "remove", "id": "ex1"}\n'
        '{"op": "modify_query", "id": "ex2", "prompt": "Is \'sun moon star\' nice?"}\n'
        '{"op": "correct_response", "id": "ex5", "response": " Maybe"}\n'
    )
    return root


@pytest.fixture(scope="module")
def trained(data):
    """(train dry-run table, real training seconds, adapter directory)."""
    out = data / "adapter"
    dry = cli("train", "--data", data / "train.jsonl", "--out", out, *TRAIN, "--dry-run")
    assert dry.code == 0, dry.err
    assert not out.exists(), "--dry-run wrote the output directory"
    real = cli("train", "--data", data / "train.jsonl", "--out", out, *TRAIN)
    assert real.code == 0, real.err
    seconds = float(re.search(r"trained on \d+ examples in ([\d.]+) s", real.out).group(1))
    return dry.out, seconds, out


def test_train_dry_run_within_factor_2(trained):
    table, real_seconds, _ = trained
    stages = stage_seconds(table)
    assert {"load and checks", "tokenize", "train", "save", "total"} <= set(stages), table
    # the real run's printed time covers tokenisation and the training loop
    ratio = within_factor_2(stages["tokenize"] + stages["train"], real_seconds)
    print(f"train: estimate/real = {ratio:.2f}")


def test_erase_dry_run_within_factor_2(data, trained):
    _, _, adapter = trained
    common = ["erase", "--adapter", adapter, "--data", data / "train.jsonl", "--requests", data / "requests.jsonl"]
    out = data / "erased"
    dry = cli(*common, "--out", out, *ERASE, "--dry-run")
    assert dry.code == 0, dry.err
    assert not out.exists(), "--dry-run wrote the output directory"
    assert "nothing was written" in dry.out and "process" in dry.out
    stages = stage_seconds(dry.out)
    assert {"load and checks", "prepare", "gradients", "solve (cg)", "save", "total"} <= set(stages), dry.out

    start = time.perf_counter()
    real = cli(*common, "--out", out, *ERASE)
    wall = time.perf_counter() - start
    assert real.code == 0, real.err
    report = json.loads((out / "erasure_report.json").read_text())
    assert report["solver"]["iterations"] == 20  # tol = 1e-30: every iteration runs, as estimated
    timings = report["timings_s"]
    compute = stages["prepare"] + stages["gradients"] + stages["solve (cg)"]
    ratio = within_factor_2(compute, timings["total_s"])
    solve_ratio = within_factor_2(stages["solve (cg)"], timings["solve_s"])
    # the whole command (warm imports in this process): load and checks, the stages, writing
    command_ratio = within_factor_2(stages["total"], wall)
    print(f"erase: estimate/real = {ratio:.2f} (solve {solve_ratio:.2f}, whole command {command_ratio:.2f})")


@pytest.fixture(scope="module")
def kfac_cache(data, trained):
    """A K-FAC cache of the trained adapter (no step calibration)."""
    _, _, adapter = trained
    cache = data / "kfac"
    done = cli("fit-curvature", "--adapter", adapter, "--data", data / "train.jsonl", "--out", cache, "--method", "kfac",
               "--calibration-examples", "0")
    assert done.code == 0, done.err
    return cache


def test_erase_dry_run_with_kfac_direct_within_factor_2(data, trained, kfac_cache):
    """One K-FAC inverse and one product: a stage of few calls, where the first call's initialisation
    counts. Fresh processes (the console script), as a user runs them: both start cold."""
    _, _, adapter = trained
    cache = kfac_cache
    common = ["erase", "--adapter", adapter, "--data", data / "train.jsonl", "--requests", data / "requests.jsonl",
              "--curvature-cache", cache, "--curvature-use", "direct", "--damping", "1e-3"]
    out = data / "erased-kfac"
    dry = script(*common, "--out", out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not out.exists()
    stages = stage_seconds(dry.stdout)
    real = script(*common, "--out", out)
    assert real.returncode == 0, real.stderr
    timings = json.loads((out / "erasure_report.json").read_text())["timings_s"]
    ratio = within_factor_2(stages["prepare"] + stages["gradients"] + stages["solve (kfac)"], timings["total_s"])
    print(f"erase (kfac direct): estimate/real = {ratio:.2f}")


def test_erase_dry_run_with_kfac_preconditioned_sgd_within_factor_2(data, trained, kfac_cache):
    """sgd preconditioned by the cache: mini-batch products, probe checks, power iteration on PA, and one
    cache inverse per step and per power-iteration product."""
    _, _, adapter = trained
    common = ["erase", "--adapter", adapter, "--data", data / "train.jsonl", "--requests", data / "requests.jsonl",
              "--curvature-cache", kfac_cache, "--curvature-use", "precondition", "--solver", "sgd", "--damping", "1e-3",
              "--max-iters", "100", "--tol", "1e-30", "--batch-size", "8"]
    out = data / "erased-kfac-sgd"
    dry = cli(*common, "--out", out, "--dry-run")
    assert dry.code == 0, dry.err
    assert "preconditioner" in dry.out, dry.out
    stages = stage_seconds(dry.out)
    real = cli(*common, "--out", out)
    assert real.code == 0, real.err
    report = json.loads((out / "erasure_report.json").read_text())
    assert report["solver"]["iterations"] == 100 and report["solver"]["preconditioned"]
    ratio = within_factor_2(stages["solve (sgd)"], report["timings_s"]["solve_s"])
    print(f"erase (kfac-preconditioned sgd): estimate/real solve = {ratio:.2f}")


@pytest.fixture(scope="module")
def curvature_data(tmp_path_factory):
    """(data, adapter) for fit-curvature: 256 examples, so that the fit takes long enough to time."""
    root = tmp_path_factory.mktemp("fit-curvature")
    write_examples(root / "train.jsonl", toy_examples(256, seed=2))
    adapter = root / "adapter"
    done = cli("train", "--data", root / "train.jsonl", "--out", adapter, "--model", "tiny", "--lora-r", "4",
               "--target-modules", "q_proj", "v_proj", "--epochs", "1", "--lr", "1e-2", "--weight-decay", "0.1",
               "--max-length", "128")
    assert done.code == 0, done.err
    return root / "train.jsonl", adapter


@pytest.mark.parametrize("method", ["kfac", "datainf"])
def test_fit_curvature_dry_run_within_factor_2(curvature_data, method):
    """The fit and the step-length calibration against ``curvature.json``'s fit_time_s and calibration
    time_s; the dry run writes nothing. Fresh processes (the console script), as a user runs them: in this
    process the dry run's probes would warm up the real run, whose first calls then cost less."""
    data, adapter = curvature_data
    common = ["fit-curvature", "--adapter", adapter, "--data", data, "--method", method]
    out = adapter.parent / f"curvature-{method}"
    dry = script(*common, "--out", out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not out.exists(), "--dry-run wrote the output directory"
    assert "nothing was written" in dry.stdout
    stages = stage_seconds(dry.stdout)
    fit = f"fit ({method})"
    assert {"load and checks", "tokenize", fit, "calibrate", "save", "total"} <= set(stages), dry.stdout

    real = script(*common, "--out", out)
    assert real.returncode == 0, real.stderr
    metadata = json.loads((out / "curvature.json").read_text())
    fit_ratio = within_factor_2(stages[fit], metadata["fit_time_s"])
    calibration_ratio = within_factor_2(stages["calibrate"], metadata["calibration"]["time_s"])
    print(f"fit-curvature ({method}): estimate/real fit {fit_ratio:.2f} ({stages[fit]:.2f} / "
          f"{metadata['fit_time_s']:.2f} s), calibration {calibration_ratio:.2f} ({stages['calibrate']:.2f} / "
          f"{metadata['calibration']['time_s']:.2f} s)")


def test_fit_curvature_dry_run_without_calibration(curvature_data):
    """--calibration-examples 0: no calibration stage; EK-FAC's stage is named after the method."""
    data, adapter = curvature_data
    out = adapter.parent / "never"
    dry = cli("fit-curvature", "--adapter", adapter, "--data", data, "--out", out, "--method", "ekfac",
              "--calibration-examples", "0", "--curvature-examples", "64", "--dry-run")
    assert dry.code == 0, dry.err
    assert not out.exists()
    stages = stage_seconds(dry.out)
    assert {"fit (ekfac)", "save"} <= set(stages) and "calibrate" not in stages, dry.out
    assert "fit examples 64" in dry.out


def test_dry_run_refusals_write_nothing(data, trained):
    _, _, adapter = trained
    # an existing output directory is refused in a dry run too (the real run would fail on it)
    dry = cli("train", "--data", data / "train.jsonl", "--out", adapter, *TRAIN, "--dry-run")
    assert dry.code == 3 and "already exists" in dry.err
    # the direct solver's size limit is reported before any probe
    out = data / "never"
    dry = cli("erase", "--adapter", adapter, "--data", data / "train.jsonl", "--requests", data / "requests.jsonl",
              "--out", out, "--solver", "direct", "--dry-run", "--curvature", "hessian")
    assert dry.code == 0, dry.err  # 896 parameters: within the direct solver's limit
    assert "solve (direct)" in dry.out
    assert not out.exists()


def test_fit_batch_cost_recovers_a_linear_cost():
    """Synthetic batches whose 'operation' sleeps fixed + per-token seconds: the fit recovers both."""
    def batch(size: int, length: int) -> list[TokenizedExample]:
        return [TokenizedExample(tuple(range(length)), 1)] * size

    def operation(items) -> None:
        time.sleep(0.004 + 2e-5 * len(items) * len(items[0].input_ids))

    batches = [batch(8, 50), batch(8, 100), batch(8, 150), batch(2, 40)]
    cost = fit_batch_cost(operation, batches, ProbeSettings(min_probe_s=0.05, max_repeats=5))
    for b in batches:
        predicted, truth = cost(len(b) * len(b[0].input_ids)), 0.004 + 2e-5 * len(b) * len(b[0].input_ids)
        assert predicted == pytest.approx(truth, rel=0.3)
    assert BatchCost(1.0, 0.5).total([2, 4]) == pytest.approx(5.0)


def test_table_lists_stages_total_and_notes():
    estimate = RunEstimate("erase", [StageEstimate("gradients", 1.5, 400.0, "x"), StageEstimate("solve (cg)", 2.5, 420.0, "y")],
                           {"adapter": "10 parameters"}, ["a note"])
    text = estimate.table()
    assert stage_seconds(text) == {"gradients": 1.5, "solve (cg)": 2.5, "total": 4.0}
    assert estimate.peak_mib == 420.0 and "note: a note" in text and "adapter 10 parameters" in text
    assert estimate.to_json()["total_seconds"] == 4.0
