"""Corruption tasks: applying the generated requests to the corrupted set gives back the target set."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llmeraser.data import Example, read_examples
from llmeraser.errors import InputError
from llmeraser.requests import (
    CorrectResponse,
    ModifyQuery,
    Remove,
    edited_training_set,
    read_requests,
    resolve,
)
from llmeraser_bench.recsys.corruption import (
    Corruption,
    label_noise_task,
    make_task,
    query_noise_task,
    removal_task,
    user_of,
    write_task,
)
from llmeraser_bench.recsys.ratings import load_ratings
from llmeraser_bench.recsys.tallrec import (
    NO,
    YES,
    TallRecConfig,
    TallRecSplits,
    build_tallrec,
)


@pytest.fixture
def splits(tmp_path: Path) -> TallRecSplits:
    """TALLRec splits from a raw ml-100k style fixture: 8 users x 20 ratings over 80 movies."""
    rng = random.Random(5)
    directory = tmp_path / "ml"
    directory.mkdir()
    rows = [
        (user, item, rng.randint(1, 5), 1000 * user + k)
        for user in range(1, 9)
        for k, item in enumerate(rng.sample(range(1, 81), 20))
    ]
    (directory / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (directory / "u.item").write_text("".join(f"{i}|Film {i} (1990)|x\n" for i in range(1, 81)))
    return build_tallrec(load_ratings(directory), TallRecConfig(history_length=5))


def applied(corruption: Corruption) -> list[Example]:
    """The corrupted training set after resolving and applying its requests."""
    return edited_training_set(corruption.train, resolve(corruption.requests, corruption.train))


def test_removal_of_examples(splits: TallRecSplits) -> None:
    clean = splits.train
    task = removal_task(clean, 0.1, seed=1)
    removed = {r.id for r in task.requests}
    assert all(isinstance(r, Remove) for r in task.requests)
    assert len(removed) == round(0.1 * len(clean)) and task.train == clean
    assert applied(task) == task.target == [e for e in clean if e.id not in removed]
    assert removal_task(clean, 0.1, seed=1).requests == task.requests
    assert removal_task(clean, 0.1, seed=2).requests != task.requests


def test_removal_by_user(splits: TallRecSplits) -> None:
    clean = splits.train
    task = make_task(splits, "removal", 0.25, seed=0, by_user=True)
    removed_users = {user_of(r.id) for r in task.requests}
    assert len(removed_users) == 2  # 25% of 8 users
    assert {r.id for r in task.requests} == {e.id for e in clean if splits.records[e.id].user_id in removed_users}
    assert applied(task) == [e for e in clean if splits.records[e.id].user_id not in removed_users]
    # without records, users come from the ids u<user>-<index>
    assert removal_task(clean, 0.25, seed=0, by_user=True).requests == task.requests


def test_label_noise(splits: TallRecSplits) -> None:
    clean = splits.train
    task = label_noise_task(clean, 0.2, seed=3)
    flipped = {r.id for r in task.requests}
    assert len(flipped) == round(0.2 * len(clean))
    for before, after in zip(clean, task.train):
        assert before.id == after.id and before.prompt == after.prompt
        assert (before.response != after.response) == (before.id in flipped)
        assert after.response in (YES, NO)
    assert all(isinstance(r, CorrectResponse) for r in task.requests)
    assert applied(task) == clean == task.target


@pytest.mark.parametrize("mode", ["insert", "replace", "flip"])
def test_query_noise(splits: TallRecSplits, mode: str) -> None:
    clean = splits.train
    task = query_noise_task(splits, 0.3, seed=4, mode=mode, n_noise=2)  # type: ignore[arg-type]
    noisy_ids = {r.id for r in task.requests}
    assert len(noisy_ids) == round(0.3 * len(clean)) and set(task.records) == noisy_ids
    assert all(isinstance(r, ModifyQuery) for r in task.requests)
    for before, after in zip(clean, task.train):
        assert before.id == after.id and before.response == after.response
        assert (before.prompt != after.prompt) == (before.id in noisy_ids)
    for example_id, noisy in task.records.items():
        record = splits.records[example_id]
        clean_items = [item for item, _ in record.history]
        noisy_items = [item for item, _ in noisy.history]
        assert noisy.target == record.target and noisy.label == record.label
        assert record.target not in noisy_items and len(set(noisy_items)) == len(noisy_items)
        if mode == "insert":
            assert len(noisy_items) == len(clean_items) + 2
            assert [i for i in noisy_items if i in clean_items] == clean_items  # order of real items kept
        elif mode == "replace":
            assert len(noisy_items) == len(clean_items) and sum(a != b for a, b in zip(noisy_items, clean_items)) == 2
        else:
            assert noisy_items == clean_items
            assert sum(a[1] != b[1] for a, b in zip(noisy.history, record.history)) == 2
    assert applied(task) == clean == task.target
    assert query_noise_task(splits, 0.3, seed=4, mode=mode, n_noise=2).train == task.train  # type: ignore[arg-type]


def test_write_task_round_trip(splits: TallRecSplits, tmp_path: Path) -> None:
    for name in ("removal", "query", "response"):
        task = make_task(splits, name, 0.1, seed=0)  # type: ignore[arg-type]
        train_path, requests_path = write_task(tmp_path / name, task)
        assert (train_path.name, requests_path.name) == ("train.jsonl", "requests.jsonl")
        train, requests = read_examples(train_path), read_requests(requests_path)
        assert train == task.train and requests == task.requests
        assert edited_training_set(train, resolve(requests, train)) == task.target


def test_bad_arguments(splits: TallRecSplits) -> None:
    with pytest.raises(InputError, match="fraction"):
        removal_task(splits.train, 1.0)
    with pytest.raises(InputError, match="fraction"):
        label_noise_task(splits.train, 0.0)
    with pytest.raises(InputError, match="mode"):
        query_noise_task(splits, 0.1, mode="shuffle")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown task"):
        make_task(splits, "poison", 0.1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="is not ' Yes' or ' No'"):
        label_noise_task([Example("a", "p", "maybe")], 0.5)
