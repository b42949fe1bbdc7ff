"""TALLRec builder: chronology, splits, labels, determinism, on a fixture and on the real ml-100k copy."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from llmeraser.errors import InputError
from llmeraser_bench.recsys.ratings import RatingData, default_ml100k_path, load_ratings
from llmeraser_bench.recsys.tallrec import (
    NO,
    YES,
    TallRecConfig,
    TallRecSplits,
    build_tallrec,
    movielens_demo_examples,
    render_prompt,
    sample_tallrec,
)


def movielens_fixture(root: Path, n_users: int = 6, per_user: int = 16, seed: int = 3) -> Path:
    """A raw ml-100k style directory with random ratings, written in shuffled (non-chronological) order."""
    rng = random.Random(seed)
    rows = []
    for user in range(1, n_users + 1):
        items = rng.sample(range(1, 61), per_user)
        times = rng.sample(range(10_000, 20_000), per_user)
        rows += [(user, item, rng.randint(1, 5), time) for item, time in zip(items, times)]
    rng.shuffle(rows)
    directory = root / "ml-fixture"
    directory.mkdir()
    (directory / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    titles = "".join(f"{i}|Movie {i} (19{i:02d})|01-Jan-1990||http://x|0\n" for i in range(1, 61))
    (directory / "u.item").write_text(titles)
    return directory


@pytest.fixture
def data(tmp_path: Path) -> RatingData:
    return load_ratings(movielens_fixture(tmp_path))


def check_invariants(data: RatingData, splits: TallRecSplits, threshold: float | None = 3.0) -> None:
    """Chronology, split order and disjointness, labels vs ratings, unique ids, prompt/response shape."""
    rating = {(i.user_id, i.item_id): i for i in data.interactions}
    ids = [e.id for name in ("train", "valid", "test") for e in splits.examples(name)]
    assert len(ids) == len(set(ids)) == len(splits.records)
    last_time: dict[str, dict[str, list[int]]] = {}
    for name in ("train", "valid", "test"):
        for example in splits.examples(name):
            record = splits.records[example.id]
            assert record.split == name
            assert re.fullmatch(rf"u{record.user_id}-\d+", example.id)
            target = rating[(record.user_id, record.target)]
            assert target.timestamp == record.timestamp
            assert all(rating[(record.user_id, item)].timestamp <= target.timestamp for item, _ in record.history)
            assert record.target not in {item for item, _ in record.history}
            if threshold is not None:
                assert record.label == (target.rating > threshold)
                for item, liked in record.history:
                    assert liked == (rating[(record.user_id, item)].rating > threshold)
            assert example.response == (YES if record.label else NO)
            assert example.prompt.endswith("\nAnswer:")
            assert example.prompt == render_prompt(record.history, record.target, splits.item_titles, splits.item_noun)
            last_time.setdefault(record.user_id, {}).setdefault(name, []).append(record.timestamp)
    for times in last_time.values():  # per user: train < valid < test in time
        order = [times[name] for name in ("train", "valid", "test") if name in times]
        for earlier, later in zip(order, order[1:]):
            assert max(earlier) <= min(later)


def test_fixture_invariants_and_full_history(data: RatingData) -> None:
    config = TallRecConfig(history_length=5, valid_fraction=0.2, test_fraction=0.2)
    splits = build_tallrec(data, config)
    check_invariants(data, splits)
    by_user = data.by_user()
    for record in splits.records.values():
        position = int(record.id.rsplit("-", 1)[1])
        sequence = by_user[record.user_id]
        assert sequence[position].item_id == record.target
        assert [item for item, _ in record.history] == [i.item_id for i in sequence[position - 5 : position]]
    # every interaction after the 5th is a target exactly once: 6 users x (16 - 5)
    assert len(splits.records) == 6 * 11
    assert splits.valid and splits.test and len(splits.train) > len(splits.test)
    assert splits.item_noun == "movie" and '"Movie ' in splits.train[0].prompt


def test_determinism_and_seed(data: RatingData) -> None:
    config = TallRecConfig(history_length=3, max_users=3, max_examples_per_user=4, seed=7)
    first, second = build_tallrec(data, config), build_tallrec(data, config)
    assert first.train == second.train and first.valid == second.valid and first.test == second.test
    assert len({r.user_id for r in first.records.values()}) == 3
    per_user: dict[str, int] = {}
    for record in first.records.values():
        per_user[record.user_id] = per_user.get(record.user_id, 0) + 1
    assert set(per_user.values()) == {4}
    others = [build_tallrec(data, TallRecConfig(history_length=3, max_users=3, seed=s)) for s in range(8)]
    assert len({frozenset(o.records) for o in others}) > 1


def test_min_history_zero_and_balanced(data: RatingData) -> None:
    splits = build_tallrec(data, TallRecConfig(history_length=4, min_history=0, balanced=True, valid_fraction=0.0))
    check_invariants(data, splits)
    assert any(not r.history for r in splits.records.values())
    empty = next(e for e in splits.train if not splits.records[e.id].history)
    assert empty.prompt.startswith("A user with no past movies.")
    for name in ("train", "test"):
        labels = [splits.records[e.id].label for e in splits.examples(name)]
        assert labels.count(True) == labels.count(False) > 0
    assert splits.valid == []


def test_user_median_rule_for_play_counts(tmp_path: Path) -> None:
    directory = tmp_path / "lastfm"
    directory.mkdir()
    plays = [(1, a, w) for a, w in zip(range(1, 8), [50, 10, 40, 20, 30, 70, 60])]
    plays += [(2, a, w) for a, w in zip(range(1, 6), [1, 2, 3, 4, 5])]
    play_rows = "".join(f"{u}\t{a}\t{w}\n" for u, a, w in plays)
    (directory / "user_artists.dat").write_text("userID\tartistID\tweight\n" + play_rows)
    artist_rows = "".join(f"{a}\tBand {a}\tu\tp\n" for a in range(1, 8))
    (directory / "artists.dat").write_text("id\tname\turl\tpictureURL\n" + artist_rows)
    data = load_ratings(directory)
    splits = build_tallrec(data, TallRecConfig(history_length=2, valid_fraction=0.0, test_fraction=0.0))
    check_invariants(data, splits, threshold=None)
    labels = {r.id: r.label for r in splits.records.values()}
    # user 1 median = 40: weights 40, 20, 30, 70, 60 at positions 2..6
    assert [labels[f"u1-{t}"] for t in range(2, 7)] == [False, False, False, True, True]
    assert [labels[f"u2-{t}"] for t in range(2, 5)] == [False, True, True]  # median 3
    assert splits.item_noun == "artist" and "past artists" in splits.train[0].prompt


def test_explicit_threshold_override(data: RatingData) -> None:
    splits = build_tallrec(data, TallRecConfig(history_length=2, like_threshold=4))
    check_invariants(data, splits, threshold=4.0)


@pytest.mark.parametrize(
    "config",
    [
        TallRecConfig(history_length=0),
        TallRecConfig(valid_fraction=0.6, test_fraction=0.5),
        TallRecConfig(like_threshold="mean"),
        TallRecConfig(max_users=0),
    ],
)
def test_bad_config(data: RatingData, config: TallRecConfig) -> None:
    with pytest.raises(InputError):
        build_tallrec(data, config)


def test_no_eligible_user(data: RatingData) -> None:
    with pytest.raises(InputError, match="more than 50 interactions"):
        build_tallrec(data, TallRecConfig(history_length=50))


def test_real_ml100k_few_users() -> None:
    data = load_ratings(default_ml100k_path())
    splits = build_tallrec(data, TallRecConfig(max_users=4, max_examples_per_user=12, seed=1))
    check_invariants(data, splits)
    assert len({r.user_id for r in splits.records.values()}) == 4
    assert all(len(r.history) == 10 for r in splits.records.values())


def test_movielens_demo_examples() -> None:
    demo = movielens_demo_examples(n_train=20, n_valid_or_test=8, history_length=5, seed=2)
    assert (len(demo.train), len(demo.valid), len(demo.test)) == (20, 8, 8)
    assert all(len(r.history) == 5 for r in demo.records.values())
    assert {e.response for e in demo.train} <= {YES, NO}
    again = movielens_demo_examples(n_train=20, n_valid_or_test=8, history_length=5, seed=2)
    assert again.train == demo.train and again.test == demo.test


def test_sample_tallrec_from_a_directory_with_format(tmp_path: Path) -> None:
    directory = movielens_fixture(tmp_path, n_users=6, per_user=16)
    splits = sample_tallrec(12, 3, history_length=2, seed=1, path=directory, format="movielens")
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (12, 3, 3)
    assert splits.train == sample_tallrec(12, 3, 2, 1, path=directory).train  # format detected
    with pytest.raises(InputError, match="asked for 10000 train examples"):
        sample_tallrec(10000, 3, 2, 1, path=directory)
    with pytest.raises(InputError):
        sample_tallrec(12, 3, 2, 1, path=directory, format="lastfm")
