"""The step length calibrated at fit time (``llmeraser.curvature.calibration``): the minimiser along a direction;
a calibrated direct erase runs no exact product; another damping falls back to fitting the step; the
calibration's round trip with the cache; its closeness to the step fitted on b for each method; and
``fit-curvature`` → ``erase`` using it."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from cli_helpers import FAST_TRAIN, cli
from conftest import toy_examples
from curvature.test_kfac import REQUESTS, SETTINGS, random_spd, trained_with_kfac

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature import CachedInverse, CurvatureOperator, load_cache, save_cache
from llmeraser.curvature.datainf import fit_datainf
from llmeraser.curvature.ekfac import fit_ekfac
from llmeraser.data import TokenizationConfig, tokenize_examples, write_examples
from llmeraser.eraser import erase
from llmeraser.errors import InputError


@pytest.fixture(scope="module")
def trained():
    return trained_with_kfac()


def test_step_length_minimises_the_quadratic_along_the_direction():
    """α = gᵀd / dᵀHd is the minimiser of q(α) = ½α² dᵀHd − α gᵀd on a random SPD problem: q'(α) = 0
    (autograd) and q is larger on either side; without positive curvature along d, 1.0."""
    from llmeraser.curvature import step_length

    generator = torch.Generator().manual_seed(4)
    h = random_spd(6, 3) + 0.1 * torch.eye(6, dtype=torch.float64)
    g, d = (torch.randn(6, generator=generator, dtype=torch.float64) for _ in range(2))
    alpha = step_length(g, d, h @ d)

    def q(a: torch.Tensor) -> torch.Tensor:
        return 0.5 * a**2 * (d @ h @ d) - a * (g @ d)

    at = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(q(at), at)
    assert abs(float(slope)) < 1e-12
    best = float(q(at.detach()))
    for delta in (1e-3, 0.1, 10.0):
        assert float(q(torch.tensor(alpha + delta))) > best and float(q(torch.tensor(alpha - delta))) > best
    assert step_length(g, d, -h @ d) == 1.0


def count_products(monkeypatch) -> list[int]:
    """Count ``CurvatureOperator.matvec`` calls (exact curvature products) from now on."""
    calls: list[int] = []
    original = CurvatureOperator.matvec

    def counted(self, vector):
        calls.append(self.count)
        return original(self, vector)

    monkeypatch.setattr(CurvatureOperator, "matvec", counted)
    return calls


def calibrated(trained, method: str = "kfac", damping: float = 1e-3):
    from llmeraser.curvature import calibrate_step_length

    model, tokenizer, train, factors = trained
    params = AdapterParameters.of(model)
    items = tokenize_examples(tokenizer, train, TokenizationConfig(max_length=256))
    if method != "kfac":
        factors = {"ekfac": fit_ekfac, "datainf": fit_datainf}[method](model, params, items, tokenizer.pad_token_id, batch_size=8)
    calibration = calibrate_step_length(model, params, factors, items, tokenizer.pad_token_id, examples=16, directions=8,
                                        damping=damping, weight_decay=0.1)
    return factors, calibration


def test_calibrated_direct_erase_runs_no_exact_product(trained, monkeypatch):
    """The cached α is used as is: v = α_cached (K + shift·I)⁻¹ b exactly, with no curvature product;
    --probe-examples N measures the residual of that same step with one product over N examples."""
    model, tokenizer, train, _ = trained
    factors, calibration = calibrated(trained)
    assert calibration.n_examples == 16 and len(calibration.step_lengths) == len(calibration.residuals) == 8
    assert calibration.step_length == statistics.median(calibration.step_lengths)
    calls = count_products(monkeypatch)
    direct = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, calibration=calibration, curvature_use="direct",
                   **SETTINGS)
    assert calls == []
    details = direct.solver.details
    assert details["step_length_source"] == "calibrated at fit time" and details["step_length"] == calibration.step_length
    assert details["step_length_calibration"]["residuals"] == calibration.residuals
    assert direct.report["solver"]["final_relative_residual"] is None
    params = AdapterParameters.of(model)
    expected = calibration.step_length * CachedInverse(factors, params, shift=0.1 + 1e-3)(direct.rhs)
    assert torch.equal(direct.update, expected)
    probed = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, calibration=calibration, curvature_use="direct",
                   probe_examples=5, **SETTINGS)
    assert calls == [5] and torch.equal(probed.update, direct.update)
    assert probed.solver.details["probe_examples"] == 5 and 0 < probed.solver.final_residual < 1


def test_calibration_at_another_damping_falls_back_to_fitting_the_step(trained, monkeypatch):
    model, tokenizer, train, _ = trained
    factors, calibration = calibrated(trained, damping=1e-2)
    calls = count_products(monkeypatch)
    direct = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, calibration=calibration, curvature_use="direct",
                   **SETTINGS)  # damping 1e-3
    details = direct.solver.details
    assert calls == [len(train) - 1]  # one product over the probe examples (all 23 remaining)
    assert details["step_length_source"] == f"fitted on {len(train) - 1} probe examples"
    assert "calibrated at damping + weight decay = 0.01 + 0.1" in details["step_length_fallback"]
    assert details["step_length"] != calibration.step_length
    uncalibrated = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, curvature_use="direct", **SETTINGS)
    assert uncalibrated.solver.details["step_length_fallback"] == "the curvature cache has no step-length calibration"
    assert torch.equal(uncalibrated.update, direct.update)


def test_calibration_round_trips_and_is_refused_with_the_cache(trained, tmp_path):
    from llmeraser.curvature import load_calibration

    _, calibration = calibrated(trained)
    _, _, _, factors = trained
    meta = {"model_fingerprint": "m", "adapter_sha256": "a", "data_sha256": "d", "calibration": calibration.to_json()}
    save_cache(factors, tmp_path / "curv", meta)
    _, stored = load_cache(tmp_path / "curv", {k: meta[k] for k in ("model_fingerprint", "adapter_sha256", "data_sha256")})
    assert load_calibration(stored) == calibration and stored["calibration"]["shift"] == pytest.approx(0.101)
    assert calibration.mismatch(0.101 * (1 + 1e-9), "gauss-newton") is None
    assert "the erasure uses 0.102" in calibration.mismatch(0.102, "gauss-newton")
    assert "hessian" in calibration.mismatch(0.101, "hessian")
    with pytest.raises(InputError, match="different adapter"):
        load_cache(tmp_path / "curv", {"adapter_sha256": "other"})


@pytest.mark.parametrize("method", ["kfac", "ekfac", "datainf"])
def test_calibrated_step_length_is_close_to_the_one_fitted_on_b(trained, method):
    """The α calibrated on 8 single-example gradients and 16 examples vs the α fitted at erase time on
    the actual b over all 23 remaining examples. Measured ratios (cached / fitted): see the print."""
    model, tokenizer, train, _ = trained
    factors, calibration = calibrated(trained, method)
    fitted = erase(model, tokenizer, train, REQUESTS, curvature_cache=factors, curvature_use="direct", **SETTINGS)
    ratio = calibration.step_length / fitted.solver.details["step_length"]
    print(f"{method}: cached α {calibration.step_length:.4g} (α_j {min(calibration.step_lengths):.3g}–"
          f"{max(calibration.step_lengths):.3g}), fitted on b {fitted.solver.details['step_length']:.4g}, ratio {ratio:.3f}")
    assert 0.2 < ratio < 5


def test_fit_curvature_calibrates_and_erase_uses_it(tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, toy_examples(10, seed=5))
    assert cli("train", "--model", "tiny", "--data", data, "--out", tmp_path / "adapter", *FAST_TRAIN).code == 0
    done = cli("fit-curvature", "--adapter", tmp_path / "adapter", "--data", data, "--out", tmp_path / "curv",
               "--calibration-examples", "6", "--calibration-directions", "3")
    assert done.code == 0, done.err
    stored = json.loads((tmp_path / "curv" / "curvature.json").read_text())["calibration"]
    assert stored["damping"] == 1e-2 and stored["weight_decay"] == 0.1 and len(stored["step_lengths"]) == 3
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"op": "remove", "id": "ex2"}\n')
    common = ["--adapter", tmp_path / "adapter", "--data", data, "--requests", requests,
              "--curvature-cache", tmp_path / "curv", "--curvature-use", "direct"]
    dry = cli("erase", *common, "--out", tmp_path / "erased", "--dry-run")
    assert dry.code == 0 and "step length calibrated at fit time (no product)" in dry.out, dry.err
    assert cli("erase", *common, "--out", tmp_path / "erased").code == 0
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())["solver"]
    assert report["step_length_source"] == "calibrated at fit time" and report["step_length"] == stored["step_length"]
    assert report["step_length_calibration"]["residuals"] == stored["residuals"]
    done = cli("erase", *common, "--out", tmp_path / "other", "--damping", "0.1")
    assert done.code == 0 and "fitted on 9 probe examples: the step length was calibrated at" in done.out
    report = json.loads((tmp_path / "other" / "erasure_report.json").read_text())["solver"]
    assert report["step_length_source"] == "fitted on 9 probe examples" and "0.01 + 0.1" in report["step_length_fallback"]
    assert cli("fit-curvature", "--adapter", tmp_path / "adapter", "--data", data, "--out", tmp_path / "x",
               "--calibration-directions", "0").code == 2
