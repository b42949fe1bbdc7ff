"""Quantisation check and relearning attack (``bench.robustness``) on the tiny model, against direct computations."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import one_thread, perturbed_model, toy_examples

from llmeraser.data import Example
from llmeraser.evaluate import ResponsePredictions, example_loss_values, membership_auc
from llmeraser.train import TrainConfig, train_adapter
from llmeraser_bench.quantise import quantised_merged
from llmeraser_bench.robustness import attack_metrics, measure_forgetting, mixture, owner, relearn_config, relearn_set

RECIPE = TrainConfig(epochs=2, lr=1e-2, batch_size=4, weight_decay=1e-2, max_length=64)


def test_relearn_set_prefers_the_same_owners_and_is_seeded() -> None:
    kept = [Example(f"u{u}-{k}", "q", " Yes") for u in range(5) for k in range(3)]
    forgotten = [Example("u1-9", "q", " No"), Example("u3-9", "q", " No")]
    chosen = relearn_set(kept, forgotten, 8, seed=0)
    assert len(chosen) == 8 and len({e.id for e in chosen}) == 8
    assert {owner(e.id) for e in chosen[:6]} == {"u1", "u3"}  # all 6 related examples first, then 2 others
    assert {owner(e.id) for e in chosen[6:]} <= {"u0", "u2", "u4"}
    assert chosen == relearn_set(kept, forgotten, 8, seed=0) and chosen != relearn_set(kept, forgotten, 8, seed=1)
    assert len(relearn_set(kept, forgotten, 4, seed=0)) == 4
    assert all(owner(e.id) in {"u1", "u3"} for e in relearn_set(kept, forgotten, 4))
    assert len(relearn_set(kept[:2], forgotten, 8)) == 2  # fewer kept than asked for
    assert owner("p003-phone") == "p003"
    config = relearn_config(RECIPE, 5, 6)
    assert (config.epochs, config.batch_size, config.lr, config.lr_schedule) == (5, 6, RECIPE.lr, "constant")


def test_mixture_by_hand() -> None:
    a = ResponsePredictions([torch.log(torch.tensor([[0.5, 0.5]]))], [torch.tensor([0])])
    b = ResponsePredictions([torch.log(torch.tensor([[0.9, 0.1]]))], [torch.tensor([0])])
    assert mixture([a, b]).losses() == pytest.approx([-math.log(0.7)], rel=1e-6)
    assert mixture([a]) is a


def test_attacks_match_direct_computations_and_restore_the_model() -> None:
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj", "lm_head"), r=2, scale=0.1)
    data = toy_examples(14)
    forgotten, nonmembers, relearn = data[:4], data[4:10], data[:4]  # relearning on the forgotten set itself
    theta = params.flat()
    with one_thread():
        metrics = attack_metrics(model, tokenizer, [theta], forgotten, nonmembers, relearn, RECIPE, bits=(8, 4), steps=3)
        assert torch.equal(params.flat(), theta)
        with quantised_merged(model, 4):
            q4 = example_loss_values(model, tokenizer, [*forgotten, *nonmembers], max_length=64)
        train_adapter(model, tokenizer, relearn, relearn_config(RECIPE, 3, len(relearn)))
        relearned = example_loss_values(model, tokenizer, [*forgotten, *nonmembers], max_length=64)
        params.assign(theta)
        plain = example_loss_values(model, tokenizer, forgotten, max_length=64)
        # a two-member ensemble of the same θ is the model itself
        twice = measure_forgetting(model, tokenizer, [theta, theta], lambda t: contextlib.nullcontext(), forgotten,
                                   nonmembers, 64, False, "x")
    assert set(metrics) == {f"{m}_{s}" for m in ("loss_removed", "mia") for s in ("q8", "q4", "relearn")}
    assert metrics["loss_removed_q4"] == pytest.approx(q4[:4].mean(), rel=1e-5)
    assert metrics["mia_q4"] == membership_auc(q4[:4], q4[4:])
    assert metrics["loss_removed_relearn"] == pytest.approx(relearned[:4].mean(), rel=1e-5)
    assert metrics["mia_relearn"] == membership_auc(relearned[:4], relearned[4:])
    assert metrics["loss_removed_relearn"] < plain.mean() - 0.05  # relearning on them brings their loss down
    assert abs(metrics["loss_removed_q8"] - plain.mean()) < 0.01  # 8 bits: close to the unquantised model
    assert twice["loss_removed_x"] == pytest.approx(plain.mean(), rel=1e-5)
    none = attack_metrics(model, tokenizer, [theta], forgotten, nonmembers, [], RECIPE, bits=(), steps=3)
    assert none == {}


def test_extraction_is_measured_under_each_attack() -> None:
    model, tokenizer, params = perturbed_model(("q_proj", "v_proj"), r=2, scale=0.1)
    forgotten = [Example("p0-a", "Q: code?\nA:", " x"), Example("p1-a", "Q: word?\nA:", " y")]
    with one_thread():
        metrics = attack_metrics(model, tokenizer, [params.flat()], forgotten, toy_examples(3), forgotten,
                                 TrainConfig(lr=5e-2, max_length=64), bits=(8,), steps=10, extract=True)
    assert set(metrics) == {"loss_removed_q8", "mia_q8", "extract_removed_q8", "loss_removed_relearn", "mia_relearn",
                            "extract_removed_relearn"}
    assert all(np.isfinite(v) and 0 <= metrics[k] <= 1 for k, v in metrics.items() if k.startswith("extract"))
