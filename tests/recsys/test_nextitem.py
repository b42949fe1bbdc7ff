"""The LLaRA-style next-item task (``recsys.nextitem``): fixed seeded candidates, the answer rule, the edits."""

from __future__ import annotations

import pytest
from recsys.test_tallrec import movielens_fixture

from llmeraser_bench.recsys.nextitem import (
    NextItemSplits,
    build_next_item_records,
    hit_ratio_at_1,
    next_item_query_task,
    parse_choice,
    render_example,
    with_candidates,
)
from llmeraser_bench.recsys.ratings import load_ratings


@pytest.fixture
def data(tmp_path):
    return load_ratings(movielens_fixture(tmp_path, n_users=6, per_user=16))


def test_candidates_are_seeded_fixed_and_hold_the_true_item_once(data) -> None:
    records = build_next_item_records(data, history_length=10, n_candidates=20, seed=0)
    again = build_next_item_records(data, history_length=10, n_candidates=20, seed=0)
    other = build_next_item_records(data, history_length=10, n_candidates=20, seed=1)
    assert records == again
    all_records = [r for name in ("train", "test") for r in records[name]]
    assert len(all_records) == 6 * 15 and records["valid"] == []
    differ = sum(a.candidates != b.candidates for a, b in zip(all_records, [r for n in ("train", "test") for r in other[n]]))
    assert differ == len(all_records)
    rated = {}
    for i in data.interactions:
        rated.setdefault(i.user_id, set()).add(i.item_id)
    by_user = data.by_user()
    for record in all_records:
        assert len(record.candidates) == 20 and len(set(record.candidates)) == 20
        assert record.candidates.count(record.target) == 1
        assert all(c not in rated[record.user_id] for c in record.candidates if c != record.target)
        t = int(record.id.rsplit("-", 1)[1])
        assert record.history == tuple(i.item_id for i in by_user[record.user_id][max(0, t - 10) : t])
    positions = {r.candidates.index(r.target) for r in all_records}
    assert len(positions) > 5  # shuffled: the true item is not always in the same place
    # drawn afterwards for a subset: the same candidates (the draw depends on the example alone)
    bare = build_next_item_records(data, 10, 20, seed=0, draw_candidates=False)
    assert with_candidates(bare["train"][:5], data, 20, seed=0) == records["train"][:5]


def test_rendering(data) -> None:
    record = build_next_item_records(data, seed=0)["train"][3]
    example = render_example(record, data.item_titles)
    assert example.id == record.id and example.response == " " + data.title(record.target)
    lines = example.prompt.splitlines()
    assert lines[-1] == "Answer:" and "Choose exactly one of these 20 movies:" in example.prompt
    assert sum(line.startswith('- "') for line in lines) == len(record.history) + 20


def test_hit_ratio_and_valid_answer_rule_by_hand() -> None:
    candidates = ["Heat (1995)", "Casino (1995)", "Up (2009)"]
    outputs = [" Heat (1995)\nCasino (1995)",  # first line only: names Heat → valid, a hit
               "heat  (1995) or Casino (1995)",  # names two → invalid
               " Nothing I know",  # names none → invalid
               ' "CASINO (1995)"',  # case and quotes do not matter → valid, a miss
               ""]  # empty → invalid
    assert [parse_choice(o, candidates) for o in outputs] == [0, None, None, 1, None]
    scores = hit_ratio_at_1(outputs, [candidates] * 5, ["Heat (1995)"] * 5)
    assert scores == {"hr1": pytest.approx(1 / 5), "valid_ratio": pytest.approx(2 / 5)}
    assert hit_ratio_at_1(outputs[3:4], [candidates], ["Casino (1995)"]) == {"hr1": 1.0, "valid_ratio": 1.0}


def _splits(data) -> NextItemSplits:
    from llmeraser_bench.recsys.nextitem import render_example as render
    from llmeraser_bench.recsys.tallrec import rated_items

    records = build_next_item_records(data, seed=0)
    train = records["train"][:30]
    return NextItemSplits([render(r, data.item_titles) for r in train], [], {r.id: r for r in train}, data.item_titles,
                          "movie", rated_items(data))


def test_query_modification_replace_and_delete(data) -> None:
    splits = _splits(data)
    replace = next_item_query_task(splits, 0.2, seed=0, mode="replace", n_noise=2)
    assert len(replace.requests) == 6 and replace.target == splits.train
    by_id = {e.id: e for e in splits.train}
    for request, noisy in zip(replace.requests, [e for e in replace.train if e.id in {r.id for r in replace.requests}]):
        assert request.prompt == by_id[request.id].prompt and noisy.prompt != request.prompt
        record = splits.records[request.id]
        noisy_lines = noisy.prompt.splitlines()[1 : 1 + len(record.history)]
        clean_lines = request.prompt.splitlines()[1 : 1 + len(record.history)]
        changed = [n for n, c in zip(noisy_lines, clean_lines) if n != c]
        titles = {f'- "{data.title(i)}"' for i in (*record.history, *record.candidates)}
        assert len(changed) == min(2, len(record.history)) and not set(changed) & titles
    delete = next_item_query_task(splits, 0.2, seed=0, mode="delete", n_noise=1)
    eligible = sum(len(r.history) > 1 for r in splits.records.values())  # a deletion leaves at least one item
    assert delete.train == splits.train and len(delete.requests) == int(0.2 * eligible + 0.5)
    for request in delete.requests:
        record = splits.records[request.id]
        assert len(request.prompt.splitlines()) == len(by_id[request.id].prompt.splitlines()) - 1
        assert request.prompt.endswith(by_id[request.id].prompt.split("Which movie")[1])
    assert {e.id: e for e in delete.target}[delete.requests[0].id].prompt == delete.requests[0].prompt
