"""The benchmark: baselines do what they claim, the report aggregates and judges correctly, and
``llmeraser bench --quick`` runs the whole protocol end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import cli
from conftest import tiny_lora_model, toy_examples

from llmeraser.adapter import AdapterParameters
from llmeraser.evaluate import example_loss_values
from llmeraser.requests import CorrectResponse, Remove, edited_training_set, resolve
from llmeraser.train import TrainConfig, train_adapter
from llmeraser_bench.baselines import (
    continued_finetuning,
    gradient_ascent,
    shard_assignment,
    train_sisa,
    unlearn_sisa,
)
from llmeraser_bench.pii import generate_people, pii_task
from llmeraser_bench.protocol import BenchConfig, prepare_ratio, quick_config
from llmeraser_bench.report import check_targets, summarise

RECIPE = TrainConfig(epochs=2, lr=1e-2, batch_size=4, max_length=64)


def test_shard_assignment_is_a_seeded_partition() -> None:
    ids = [f"e{i}" for i in range(10)]
    shards = shard_assignment(ids, 3, seed=1)
    assert set(shards) == set(ids)
    sizes = sorted(list(shards.values()).count(k) for k in range(3))
    assert sizes == [3, 3, 4]
    assert shards == shard_assignment(ids, 3, seed=1) and shards != shard_assignment(ids, 3, seed=2)
    with pytest.raises(ValueError):
        shard_assignment(ids, 11)


def test_sisa_retrains_exactly_the_affected_shards() -> None:
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    params = AdapterParameters.of(model)
    theta_init = params.flat()
    train = toy_examples(12)
    sisa = train_sisa(model, tokenizer, train, theta_init, 3, RECIPE)
    assert len(sisa.members) == 3 and torch.equal(params.flat(), theta_init)
    victim = train[0]
    pairs = resolve([Remove(victim.id)], train)
    after = unlearn_sisa(model, tokenizer, sisa, train, pairs, theta_init, RECIPE)
    k = sisa.shard_of[victim.id]
    assert sisa.affected(pairs) == [k]
    for j in range(3):
        if j != k:
            assert torch.equal(after.thetas[j], sisa.thetas[j])
    # the affected shard equals training on that shard without the removed example, from the same start
    params.assign(theta_init)
    train_adapter(model, tokenizer, [e for e in train if sisa.shard_of[e.id] == k and e.id != victim.id], RECIPE)
    torch.testing.assert_close(after.thetas[k], params.flat())
    assert not torch.equal(after.thetas[k], sisa.thetas[k])


def test_gradient_ascent_raises_and_finetuning_lowers_the_targeted_loss() -> None:
    model, tokenizer = tiny_lora_model(dtype=torch.float32)
    train = toy_examples(8)
    forget = train[:2]
    before = example_loss_values(model, tokenizer, forget).mean()
    result = gradient_ascent(model, tokenizer, forget, RECIPE, epochs=2)
    assert result.steps == 2 and example_loss_values(model, tokenizer, forget).mean() > before + 1e-3

    flipped = CorrectResponse(train[3].id, " No" if train[3].response == " Yes" else " Yes")
    pairs = resolve([Remove(train[0].id), flipped], train)
    new = [pairs[1].new]
    before_new = example_loss_values(model, tokenizer, new).mean()
    continued_finetuning(model, tokenizer, pairs, RECIPE)
    assert example_loss_values(model, tokenizer, new).mean() < before_new - 1e-3
    with pytest.raises(ValueError):
        continued_finetuning(model, tokenizer, pairs[:1], RECIPE)


def test_pii_task_is_consistent() -> None:
    people = generate_people(10, seed=3)
    assert len({p.name for p in people}) == 10 and people == generate_people(10, seed=3)
    task, sets = pii_task(10, 4, 0.2, seed=3)
    pairs = resolve(task.requests, task.train)
    assert edited_training_set(task.train, pairs) == task.target
    removed_people = {r.id.split("-")[0] for r in task.requests if r.op == "remove"}
    assert len(removed_people) == 2 and sum(r.op == "correct_response" for r in task.requests) == 2
    assert all(len([r for r in task.requests if r.id.startswith(p)]) == 3 for p in removed_people)
    member_ids = {e.id for e in task.train}
    assert not member_ids & {e.id.split("-")[0] for e in sets.nonmembers}
    assert {e.id.split("-")[0] for e in sets.nonmembers}.isdisjoint({e.id.split("-")[0] for e in task.train})
    assert all(e.id not in {r.id for r in task.requests} for e in sets.test)
    for old, new in zip([e for e in sets.old if e.id in {n.id for n in sets.new}], sets.new):
        assert old.prompt == new.prompt and old.response != new.response


def test_prepare_ratio_holds_out_nonmembers_and_aligns_sets() -> None:
    config = quick_config("response")
    task, sets = prepare_ratio(config, 0.25)
    train_ids = {e.id for e in task.train}
    assert len(task.train) == config.n_train and len(sets.nonmembers) == config.n_nonmembers
    assert train_ids.isdisjoint(e.id for e in sets.nonmembers)
    assert len(sets.old) == len(sets.new) == len(task.requests) == 5
    assert all(o.response != n.response and o.prompt == n.prompt for o, n in zip(sets.old, sets.new))


def _rows(task: str) -> dict:
    rows = []
    for seed, jitter in ((0, 0.0), (1, 0.02)):
        for method, test_auc, kl, seconds in (("original", 0.60, 0.02, 100.0), ("retrain", 0.70, 0.0, 100.0),
                                              ("llmeraser", 0.69, 0.001, 10.0)):
            rows.append({"ratio": 0.05, "seed": seed, "method": method, "test_auc": test_auc + jitter,
                         "loss_old": 1.0, "mia_auc": 0.5, "kl_test": kl, "kl_edited": kl, "seconds": seconds,
                         "peak_rss_mib": 100.0})
    return {"config": {"task": task, "seeds": [0, 1]}, "rows": rows, "requests": {"0.05": 3},
            "spread": [{"ratio": 0.05, "kl_test": 0.004, "kl_edited": 0.004}]}


def test_summary_and_targets() -> None:
    results = _rows("query")
    summary = summarise(results)["0.05"]
    assert summary["methods"]["retrain"]["test_auc"]["mean"] == pytest.approx(0.71)
    assert summary["methods"]["retrain"]["test_auc"]["std"] == pytest.approx(0.01)
    assert math.isnan(summary["methods"]["retrain"]["loss_new"]["mean"])
    targets = {t["target"]: t for t in check_targets("query", summarise(results))}
    recovery = targets["llmeraser: recovers ≥ 80 % of Retrain's AUC gain over the corrupted model"]
    assert recovery["value"] == pytest.approx(0.9) and recovery["met"]
    assert targets["llmeraser: KL to Retrain (test) ≤ retrain-vs-retrain spread"]["met"]
    assert targets["llmeraser: erase time ≤ 1/5 of retrain time"]["value"] == pytest.approx(0.1)
    removal = {t["target"]: t for t in check_targets("removal", summarise(_rows("removal")))}
    assert removal["llmeraser: test AUC within 0.01 of Retrain"]["value"] == pytest.approx(0.01)
    worse = _rows("query")
    for row in worse["rows"]:
        if row["method"] == "llmeraser":
            row["test_auc"], row["kl_test"] = 0.62, 0.01
    judged = {t["target"]: t for t in check_targets("query", summarise(worse))}
    assert judged["llmeraser: recovers ≥ 80 % of Retrain's AUC gain over the corrupted model"]["value"] == pytest.approx(0.1)
    assert not judged["llmeraser: recovers ≥ 80 % of Retrain's AUC gain over the corrupted model"]["met"]
    assert not judged["llmeraser: KL to Retrain (test) ≤ retrain-vs-retrain spread"]["met"]


def test_attack_targets_compare_with_the_retrained_models() -> None:
    results = _rows("removal")
    attacked = {("retrain", 0): (1.0, 0.60, 1.5), ("retrain", 1): (1.2, 0.60, 1.7),
                ("llmeraser", 0): (0.9, 0.64, 1.6), ("llmeraser", 1): (0.9, 0.62, 1.6),
                ("original", 0): (0.5, 0.9, 0.5), ("original", 1): (0.5, 0.9, 0.5)}
    for row in results["rows"]:
        loss_q4, mia_q4, loss_relearn = attacked[row["method"], row["seed"]]
        row.update(loss_removed_q4=loss_q4, mia_q4=mia_q4, loss_removed_relearn=loss_relearn, mia_relearn=0.5)
    summary = summarise(results)
    assert summary["0.05"]["attack_range"]["loss_removed_q4"] == {"min": 1.0, "max": 1.2, "mean": pytest.approx(1.1)}
    targets = {t["target"]: t for t in check_targets("removal", summary)}
    # quantisation: the loss (0.9) is below the lowest retrained model's (1.0); the MIA mean 0.63 is not above 0.60 + 0.05
    quantised = targets["llmeraser: the quantisation attack finds no more than on Retrain (checks that find more)"]
    assert quantised["value"] == 1.0 and not quantised["met"] and "loss_removed_q4 0.900" in quantised["note"]
    relearned = targets["llmeraser: the relearning attack finds no more than on Retrain (checks that find more)"]
    assert relearned["value"] == 0.0 and relearned["met"]
    for row in results["rows"]:
        if row["method"] == "llmeraser":
            row["mia_q4"] = 0.70
    again = {t["target"]: t for t in check_targets("removal", summarise(results))}
    assert again["llmeraser: the quantisation attack finds no more than on Retrain (checks that find more)"]["value"] == 2.0


def test_a_seed_start_is_shared_only_by_the_same_training_set() -> None:
    """Removal ratios keep the training set (the original is trained once per seed); query noise corrupts a
    ratio-dependent share of it, so each ratio trains its own original."""
    from llmeraser_bench.protocol import SeedStart

    removal = [prepare_ratio(quick_config("removal"), ratio)[0].train for ratio in (0.1, 0.2)]
    query = [prepare_ratio(quick_config("query"), ratio)[0].train for ratio in (0.1, 0.2)]
    assert SeedStart.key(removal[0]) == SeedStart.key(removal[1])
    assert SeedStart.key(query[0]) != SeedStart.key(query[1])
    assert SeedStart.key(removal[0]) != SeedStart.key(list(reversed(removal[0])))  # the order is part of it
    from llmeraser_bench.protocol import task_config

    assert len(task_config("removal").ratios) == 3 and len(task_config("query").ratios) == 1  # a curve where it is cheap


def test_bench_config_rejects_bad_methods() -> None:
    with pytest.raises(ValueError, match="finetune"):
        BenchConfig(task="removal", methods=("finetune",)).validate()
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(task="query", methods=("magic",)).validate()
    assert "retrain" in BenchConfig(task="query", methods=("llmeraser",)).chosen_methods()
    with pytest.raises(ValueError, match="quantise_bits"):
        BenchConfig(task="query", quantise_bits=(1,)).validate()


def assert_attacks(results: dict, extract: bool) -> None:
    """Every method, the retrained model included, carries finite quantisation and relearning metrics, and
    each eraser gets one target per attack."""
    measures = ("loss_removed", "mia", *(("extract_removed",) if extract else ()))
    keys = [f"{m}_{a}" for m in measures for a in ("q8", "q4", "relearn")]
    for row in results["rows"]:
        assert all(np.isfinite(row[k]) for k in keys), (row["method"], {k: row.get(k) for k in keys})
    assert {row["method"] for row in results["rows"] if "loss_removed_q4" in row} >= {"original", "retrain"}
    if extract:
        assert all(0 <= row["extract_removed_q4"] <= 1 for row in results["rows"])
    block = next(iter(results["summary"].values()))
    assert set(block["attack_range"]) == set(keys) and all(np.isfinite(block["attack_range"][k]["min"]) for k in keys)
    targets = [t["target"] for t in results["targets"]]
    for attack in ("quantisation", "relearning"):
        assert any(t.startswith("llmeraser_tr:") and f"the {attack} attack" in t for t in targets)


@pytest.mark.parametrize("task", ["response", "pii"])
def test_bench_quick_end_to_end(tmp_path, task: str) -> None:
    out = tmp_path / "bench"
    result = cli("bench", "--task", task, "--quick", "--out", out)
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    methods = {"response": {"original", "retrain", "llmeraser", "llmeraser_cached", "llmeraser_tr", "finetune", "sisa"},
               "pii": {"original", "retrain", "llmeraser", "llmeraser_cached", "llmeraser_tr", "gradient_ascent"}}[task]
    assert {row["method"] for row in results["rows"]} == methods
    assert {row["seed"] for row in results["rows"]} == {0, 1}
    assert results["command"].startswith("llmeraser bench --task") and results["machine"]["cpu_count"]
    retrain = [row for row in results["rows"] if row["method"] == "retrain"]
    assert all(row["kl_test"] == pytest.approx(0.0, abs=1e-9) for row in retrain)
    assert all(row["kl_test"] > 0 for row in results["rows"] if row["method"] == "original")
    assert len(results["spread"]) == 2 and all(s["kl_test"] > 0 for s in results["spread"])
    assert all(np.isfinite(r["seconds"]) and r["peak_rss_mib"] > 0 for r in results["rows"])
    assert results["residuals"] and all(len(r["history"]) >= 1 for r in results["residuals"])
    for name in ("results.md", "effect_captured.png", "solver_residual.png", "time_per_method.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "metrics_vs_ratio.png").exists()  # one ratio: nothing to draw against the ratio
    block = results["summary"]["0.1" if task == "response" else "0.125"]
    assert set(block["effects"]) >= {"llmeraser_cached", "llmeraser_tr"} and block["resolution"]
    assert "effect captured" in (out / "results.md").read_text()
    assert any(t["target"].startswith("llmeraser_tr:") for t in results["targets"])
    assert "retrain vs retrain" in result.out and "llmeraser" in (out / "results.md").read_text()
    if task == "response":
        assert any("recovers" in t["target"] for t in results["targets"])
        assert any(t["target"].startswith("llmeraser_cached:") for t in results["targets"])
    cached = [row for row in results["rows"] if row["method"] == "llmeraser_cached"]
    assert all(row["kl_test"] < 10 for row in cached) and len(results["caches"]) == 2
    assert_attacks(results, extract=task == "pii")
    assert "is it really forgotten" in (out / "results.md").read_text()
    assert all(c["fit"]["seconds"] > 0 and c["step_length"] > 0 for c in results["caches"])


def test_bench_on_a_rating_directory_with_chosen_methods(tmp_path) -> None:
    from recsys.test_tallrec import movielens_fixture

    directory = movielens_fixture(tmp_path, n_users=10, per_user=16)
    out = tmp_path / "bench"
    result = cli("bench", "--task", "removal", "--quick", "--data", directory, "--format", "movielens",
                 "--methods", "llmeraser_cached", "gradient_ascent", "--seeds", "1", "--cache-method", "datainf",
                 "--ratio", "0.1", "0.2", "--out", out)
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} == {"original", "retrain", "llmeraser_cached", "gradient_ascent"}
    assert {c["method"] for c in results["caches"]} == {"datainf"}
    assert sorted({row["ratio"] for row in results["rows"]}) == [0.1, 0.2]
    assert results["requests"] == {"0.1": 2, "0.2": 4} and results["spread"] == []
    assert all(np.isfinite(row["loss_removed_q4"]) and np.isfinite(row["mia_relearn"]) for row in results["rows"])
    assert (out / "metrics_vs_ratio.png").stat().st_size > 0  # two ratios
    # removal leaves the training set as it is: the second ratio reuses the seed's original and its curvature
    originals = [row for row in results["rows"] if row["method"] == "original"]
    assert len(originals) == 2 and originals[0]["seconds"] == originals[1]["seconds"]
    assert originals[0]["test_auc"] == originals[1]["test_auc"] and originals[0]["kl_test"] > 0
    assert [c.get("reused", False) for c in results["caches"]] == [False, True]
    assert result.out.count("train original on") == 1 and "reused" in result.out
    assert results["config"]["data"] == str(directory) and results["config"]["format"] == "movielens"
    bad = cli("bench", "--task", "removal", "--quick", "--methods", "finetune", "--out", tmp_path / "x")
    assert bad.code == 3 and "finetune" in bad.err and not (tmp_path / "x").exists()


def test_bench_quick_next_item(tmp_path) -> None:
    """One seed: what a second adds (the spread over seeds, the summary's intervals) the Yes/No and PII runs
    above check, and each next-item seed costs ~1 minute (greedy decoding of every answer, the attacks)."""
    out = tmp_path / "bench"
    result = cli("bench", "--task", "next-item", "--quick", "--seeds", "1", "--out", out)
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} == {"original", "retrain", "llmeraser", "llmeraser_cached",
                                                          "llmeraser_tr", "finetune", "sisa"}
    for row in results["rows"]:
        assert 0 <= row["hr1"] <= row["valid_ratio"] <= 1 and np.isfinite(row["loss_new"]) and np.isfinite(row["loss_old"])
    assert all(row["kl_test"] == pytest.approx(0.0, abs=1e-9) for row in results["rows"] if row["method"] == "retrain")
    assert results["requests"] == {"0.1": 2} and results["config"]["n_candidates"] == 5
    assert_attacks(results, extract=False)
    assert any("HR@1 gain" in t["target"] for t in results["targets"])
    assert "HR@1" in (out / "results.md").read_text()


def test_next_item_sets_are_aligned() -> None:
    from llmeraser_bench.protocol import next_item_config
    from llmeraser_bench.recsys.nextitem import candidate_titles_of

    config = dataclasses.replace(next_item_config(quick=True), n_candidates=20)
    task, sets = prepare_ratio(config, 0.2)
    assert len(task.train) == config.n_train and len(sets.test) == config.n_test
    assert {e.id for e in task.train}.isdisjoint(e.id for e in sets.nonmembers)
    assert len(sets.old) == len(sets.new) == len(task.requests) == 4
    assert all(o.response == n.response and o.prompt != n.prompt for o, n in zip(sets.old, sets.new))
    for example in sets.test:
        titles = candidate_titles_of(example.prompt)
        assert len(titles) == 20 and titles.count(example.response.strip()) == 1
    assert sets.relearn and {e.id for e in sets.relearn}.isdisjoint(r.id for r in task.requests)
    delete = dataclasses.replace(config, query_mode="delete", history_length=3)  # a deletion leaves ≥ 1 item
    task, sets = prepare_ratio(delete, 0.2)
    assert all(len(n.prompt.splitlines()) == len(o.prompt.splitlines()) - 1 for o, n in zip(sets.old, sets.new))


def test_bench_checkpoints_after_every_seed(tmp_path) -> None:
    """An interrupted run leaves what it measured: after each seed the results so far are handed over,
    marked incomplete with the seeds done, and render as a partial run."""
    from llmeraser_bench import finish, run_bench
    from llmeraser_bench.protocol import pii_config
    from llmeraser_bench.report import effect_plot_title, render_markdown

    config = dataclasses.replace(pii_config(quick=True), methods=("original", "retrain"))
    snapshots: list[dict] = []
    results = run_bench(config, log=lambda line: None, checkpoint=snapshots.append)
    assert [len(s["seeds_done"]) for s in snapshots] == [1, 2]
    assert all(s["complete"] is False for s in snapshots) and results["complete"] is True
    assert {row["seed"] for row in snapshots[0]["rows"]} == {0}
    assert snapshots[1]["spread"] and not snapshots[0]["spread"]  # the retrain spread needs two seeds
    partial = render_markdown(finish(snapshots[0]))
    assert "**Partial run**" in partial and "mean ± std over seeds 0)" in partial
    assert "Partial run" not in render_markdown(finish(results))
    ratio = config.ratios[0]  # the effect chart's title counts the seeds scored, not the seeds configured
    assert "mean over 1 paired seed," in effect_plot_title(snapshots[0], ratio)
    assert "mean over 2 paired seeds," in effect_plot_title(results, ratio)
    assert "mean over 2 paired seeds," in effect_plot_title(results, str(ratio))  # the summary's key, as plotted


def test_mixture_decoding_with_per_theta_caches_equals_recomputing_every_prefix() -> None:
    """SISA's ensemble answer: the key/value cache kept per θ gives the tokens a full forward pass of every
    prefix under every θ gives (the mixture's log-probabilities to 1e-9), and one θ is plain greedy decoding."""
    import torch

    from llmeraser.adapter import AdapterParameters, attach_lora
    from llmeraser.models import load_base_model
    from llmeraser_bench.nextitem import mixture_greedy_answers
    from llmeraser_bench.pii import greedy_answers
    from llmeraser_bench.protocol import TINY_LORA

    base, tokenizer = load_base_model("tiny", seed=0)
    model = attach_lora(base, TINY_LORA)
    params = AdapterParameters.of(model)
    theta = params.flat()
    generator = torch.Generator().manual_seed(3)
    thetas = [theta + 0.5 * torch.randn(theta.shape, generator=generator, dtype=theta.dtype) for _ in range(3)]
    prompts = ["Which movie next? Candidates: Heat, Alien", "History: Fargo\nAnswer:"]

    def recomputed(prompt: str, steps: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(steps):
                parts = []
                for t in thetas:
                    params.assign(t)
                    parts.append(torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1))
                token = int(torch.logsumexp(torch.stack(parts), dim=0).argmax())
                if token == tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        params.assign(theta)
        return tokenizer.decode(ids[0, start:], skip_special_tokens=True)

    answers = mixture_greedy_answers(model, tokenizer, prompts, thetas, 6)
    assert answers == [recomputed(p, 6) for p in prompts] and all(answers)
    assert torch.equal(params.flat(), theta)
    params.assign(thetas[1])
    single = greedy_answers(model, tokenizer, prompts, 6)
    params.assign(theta)
    assert mixture_greedy_answers(model, tokenizer, prompts, thetas[1:2], 6) == single
