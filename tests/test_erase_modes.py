"""``erase --mode auto|update|retrain``: the plan (pure), the paired retrain it may choose, and the cached
trust-region update it fits on first use."""

from __future__ import annotations

import json

import pytest
from cli_helpers import cli, digest
from conftest import toy_examples

from llmeraser.data import write_examples
from llmeraser.plan import RETRAIN_MARGIN, configured_update_cost, fit_cost, plan_erase, retrain_cost, update_cost
from llmeraser.train import TrainConfig

REQUESTS = ('{"op": "remove", "id": "ex1"}\n{"op": "remove", "id": "ex6"}\n'
            '{"op": "correct_response", "id": "ex4", "response": " Maybe"}\n')
TRAIN = ["--lora-r", "2", "--target-modules", "q_proj", "v_proj", "--lr", "1e-2", "--weight-decay", "0.1",
         "--max-length", "64"]


def test_plan_costs_and_choice() -> None:
    assert retrain_cost(90, 3, "adam") == 270 and retrain_cost(90, 3, "lbfgs") == 27000
    assert fit_cost(100, 8, 4) == 250 + 4 * 25
    assert update_cost(3, 1, 10, 0, 2, evaluations_per_step=3) == pytest.approx(4 + 2 * (11 + (10 + 3 + 1)))
    short = TrainConfig(epochs=2)
    cheap = plan_erase(n_train=40, n_removed=2, n_old=3, n_new=1, recipe=short, cache_fitted=False)
    assert cheap.choice == "retrain" and "exact" in cheap.reason
    long = TrainConfig(epochs=200)
    costly = plan_erase(n_train=40, n_removed=2, n_old=3, n_new=1, recipe=long, cache_fitted=False)
    assert costly.choice == "update" and RETRAIN_MARGIN * (costly.fit_cost + costly.update_cost) <= costly.retrain_cost
    fitted = plan_erase(n_train=40, n_removed=2, n_old=3, n_new=1, recipe=long, cache_fitted=True)
    assert fitted.fit_cost == 0
    assert configured_update_cost("cg", 50, 100, 3, 1, cached_direct=False) == 4 + 50 * 3 * 100
    assert configured_update_cost("cg", 50, 100, 3, 1, cached_direct=True) == 4
    outside = plan_erase(n_train=40, n_removed=2, n_old=3, n_new=1, recipe=None, cache_fitted=False)
    assert outside.choice == "update" and outside.retrain_cost is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    data, requests = root / "train.jsonl", root / "requests.jsonl"
    write_examples(data, toy_examples(16, seed=3))
    write_examples(root / "heldout.jsonl", toy_examples(8, seed=11))
    requests.write_text(REQUESTS)
    assert cli("train", "--model", "tiny", "--data", data, "--out", root / "short", "--epochs", "2", *TRAIN).code == 0
    assert cli("train", "--model", "tiny", "--data", data, "--out", root / "long", "--epochs", "120", *TRAIN).code == 0
    return root, data, requests


def test_default_erase_of_a_cheap_recipe_is_the_paired_retrain(setup, tmp_path, monkeypatch):
    """Retraining costs less than fitting and updating: the default erase retrains, in the original run's
    data order, and writes exactly what `llmeraser retrain --like` writes, with report and lineage."""
    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    root, data, requests = setup
    before = digest(root / "short")
    done = cli("erase", "--adapter", root / "short", "--data", data, "--requests", requests, "--out", tmp_path / "erased")
    assert done.code == 0, done.err
    assert "erase --mode auto: retrain" in done.out
    retrained = cli("retrain", "--like", root / "short", "--data", data, "--requests", requests, "--out", tmp_path / "ref")
    assert retrained.code == 0, retrained.err
    assert "(paired)" in retrained.out
    erased_weights = (tmp_path / "erased" / "adapter_model.safetensors").read_bytes()
    assert erased_weights == (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())
    assert report["method"] == "retrain" and report["plan"]["choice"] == "retrain"
    assert report["config"]["paired"] is True
    history = cli("history", tmp_path / "erased")
    assert history.code == 0 and "chain verified" in history.out
    assert digest(root / "short") == before  # the input adapter is untouched
    assert not (tmp_path / "cache").exists()  # nothing fitted


def test_default_erase_of_a_long_recipe_fits_once_and_takes_trust_region_steps(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    root, data, requests = setup
    before = digest(root / "long")
    args = ["--adapter", root / "long", "--data", data, "--requests", requests, "--heldout", root / "heldout.jsonl"]
    done = cli("erase", *args, "--out", tmp_path / "erased")
    assert done.code == 0, done.err
    assert "erase --mode auto: update" in done.out and "fitting the ekfac curvature once" in done.out
    caches = list((tmp_path / "cache" / "curvature").iterdir())
    assert len(caches) == 1 and (caches[0] / "curvature.json").is_file()
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())
    assert report["method"] == "update" and report["curvature_cache_method"] == "ekfac"
    region = report["trust_region"]
    assert region["steps"] and region["steps"][0]["accepted"]
    checks = region["acceptance"]
    assert checks["heldout_loss"]["examples"] == 8
    assert checks["heldout_loss"]["after"] <= checks["heldout_loss"]["before"] * 1.02 + 1e-12
    assert checks["removed_loss"]["after"] > checks["removed_loss"]["before"]  # the removal raised their loss
    assert checks["replacement_loss"]["after"] < checks["replacement_loss"]["before"]
    lineage = [json.loads(line) for line in (tmp_path / "erased" / "lineage.jsonl").read_text().splitlines()]
    assert lineage[-1]["method"] == "update" and lineage[-1]["result"]["trust_region"]["steps"]
    assert checks["bounds_followed"] is None  # off unless asked for
    assert checks["refit"] == {"steps": 0}  # no refit unless asked for
    # the second erase of the same adapter finds the fitted curvature (its steps turned along the bounds)
    again = cli("erase", *args, "--out", tmp_path / "erased2", "--trust-region-follow-bounds",
                "--trust-region-refit-steps", "2", "--trust-region-refit-kept-level")
    assert again.code == 0 and "fitting" not in again.out
    followed = json.loads((tmp_path / "erased2" / "erasure_report.json").read_text())["trust_region"]["acceptance"]
    assert set(followed["bounds_followed"]) == {"heldout_guard", "replacements_floor"}
    assert followed["refit"]["kept_level"] == pytest.approx(followed["kept_loss"]["before"])  # θ̂'s kept loss
    assert followed["heldout_loss"]["after"] <= followed["heldout_loss"]["before"] * 1.02 + 1e-12
    assert digest(root / "long") == before


def test_solver_flags_mean_a_configured_update(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    root, data, requests = setup
    done = cli("erase", "--adapter", root / "short", "--data", data, "--requests", requests, "--out", tmp_path / "e",
               "--damping", "0.1", "--max-iters", "5")
    assert done.code == 0, done.err
    assert "--mode auto" not in done.out
    report = json.loads((tmp_path / "e" / "erasure_report.json").read_text())
    assert report["method"] == "update" and report["solver"]["solver"] == "cg" and report["trust_region"] is None
    # 5 cg iterations over 14 examples cost more than 2 epochs of 14: the user is told
    assert "predicted to cost up to" in done.err and "paired retrain (28)" in done.err
    cheap = cli("erase", "--adapter", root / "long", "--data", data, "--requests", requests, "--out", tmp_path / "f",
                "--damping", "0.1", "--max-iters", "2")
    assert cheap.code == 0 and "predicted to cost" not in cheap.err  # 120 epochs: the update is cheaper


@pytest.mark.parametrize("flag,value,message", [("--steps", "0", "--steps must be >= 1"),
                                                ("--kl-budget", "0", "--kl-budget must be > 0"),
                                                ("--kept-examples", "0", "--kept-examples must be >= 1"),
                                                ("--trust-region-memory", "-1", "--trust-region-memory must be >= 0"),
                                                ("--trust-region-refit-steps", "-1",
                                                 "--trust-region-refit-steps must be >= 0"),
                                                ("--kept-tolerance", "-0.1", "--kept-tolerance must be >= 0")])
def test_bad_trust_region_flags_are_usage_errors(setup, tmp_path, flag, value, message):
    root, data, requests = setup
    done = cli("erase", "--adapter", root / "short", "--data", data, "--requests", requests, "--out", tmp_path / "x",
               flag, value)
    assert done.code == 2 and message in done.err and not (tmp_path / "x").exists()


def test_trust_region_options_keep_the_automatic_plan(setup, tmp_path, monkeypatch):
    """The trust region's own knobs (the kept guard, L-BFGS memory) are not solver flags: the default plan
    stays automatic and carries them into the update it runs."""
    from llmeraser.data import read_examples
    from llmeraser.lifecycle import Adapter
    from llmeraser.requests import read_requests

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    root, data, requests_path = setup
    plan = Adapter.load(root / "long").plan_erase(read_examples(data), read_requests(requests_path),
                                                  options={"kept_tolerance": 0.02, "trust_region_memory": 3,
                                                           "trust_region_refit_steps": 2})
    assert plan.mode == "update" and plan.choice is not None and plan.config is not None
    assert plan.config.trust_region and plan.config.curvature_use == "direct"
    assert (plan.config.kept_tolerance, plan.config.trust_region_memory, plan.config.trust_region_refit_steps) == (0.02, 3, 2)


def test_the_dry_run_estimates_the_plan_the_real_run_executes(setup, tmp_path, monkeypatch):
    """One plan object: the dry run's stages are the plan's (the curvature fit it will do first, the solve the
    config names, the trust region), the real run executes the same plan and records it; a cheap recipe's plan
    is the paired retrain and its dry run estimates training on the edited set."""
    from llmeraser.data import read_examples
    from llmeraser.lifecycle import Adapter
    from llmeraser.requests import read_requests

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    root, data, requests_path = setup
    train, requests = read_examples(data), read_requests(requests_path)
    heldout = read_examples(root / "heldout.jsonl")
    adapter = Adapter.load(root / "long")
    plan = adapter.plan_erase(train, requests, heldout=heldout)
    assert plan.mode == "update" and plan.fit is not None and plan.config is not None
    assert plan.config.trust_region and plan.config.curvature_use == "direct"
    assert plan.config.damping == plan.fit.calibration_damping  # the damping the fit calibrates α at
    estimate = adapter.estimate_plan(plan, train, requests, heldout=heldout)
    names = [stage.name for stage in estimate.stages]
    assert names[0].startswith("fit: ") and "fit: calibrate" in names
    assert "solve (ekfac)" in names and "trust region" in names and names[-1] == "save"
    assert all(stage.seconds >= 0 for stage in estimate.stages)
    assert not (tmp_path / "cache").exists()  # the dry run fitted nothing
    erased = adapter.run_plan(plan, train, requests, heldout=heldout, progress=False)
    assert erased.report["plan"] == plan.to_json()
    assert (plan.cache_path / "curvature.json").is_file()
    assert len(erased.report["trust_region"]["steps"]) <= plan.config.trust_region_steps
    # the second plan finds the fitted cache: no fit stage, the same update otherwise
    again = adapter.plan_erase(train, requests, heldout=heldout)
    assert again.fit is None and again.config == plan.config
    assert not any(s.name.startswith("fit: ") for s in adapter.estimate_plan(again, train, requests).stages)
    # a configured update: the options decide, and no cost comparison is made
    configured = adapter.plan_erase(train, requests, options={"damping": 0.1, "max_iters": 2})
    assert configured.mode == "update" and configured.choice is None and configured.config.damping == 0.1
    assert not configured.config.trust_region
    cheap = Adapter.load(root / "short")
    retrain = cheap.plan_erase(train, requests)
    assert retrain.mode == "retrain" and retrain.config is None
    estimate = cheap.estimate_plan(retrain, train, requests)
    assert estimate.command == "erase (paired retrain)" and "(paired schedule)" in estimate.stage("train").how
