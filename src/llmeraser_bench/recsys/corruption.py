"""Corrupted training sets and the requests that undo them, for the three unlearning tasks.

The protocol that uses them: benchmarks/README.md, "`llmeraser bench`".

Each generator takes the clean training set and returns a :class:`Corruption`: ``train`` is what the
"corrupted" model is trained on, ``requests`` undo the damage, and ``target`` is the training set after
the requests (what the retrained reference model is trained on):

- removal (:func:`removal_task`): ``train`` is the clean set, requests are ``Remove`` of a fraction of the
  examples (or of all examples of a fraction of the users); ``target`` is the clean set without them.
- query modification (:func:`query_noise_task`): a fraction of prompts get noisy histories; requests are
  ``ModifyQuery`` back to the clean prompts; ``target`` is the clean set.
- response correction (:func:`label_noise_task`): a fraction of Yes/No responses are flipped; requests are
  ``CorrectResponse`` back to the clean responses; ``target`` is the clean set.

The number of affected examples (or users) is ``round(fraction · n)``, at least 1; choices are seeded.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmeraser.data import Example, write_examples
from llmeraser.errors import InputError
from llmeraser.requests import (
    CorrectResponse,
    ModifyQuery,
    Remove,
    Request,
    write_requests,
)
from llmeraser_bench.recsys.tallrec import NO, YES, TallRecRecord, TallRecSplits

Task = Literal["removal", "query", "response"]
QueryNoise = Literal["insert", "replace", "flip"]
TASKS = ("removal", "query", "response")
QUERY_NOISE_MODES = ("insert", "replace", "flip")


@dataclass(frozen=True)
class Corruption:
    """A corrupted training set (``train``, same ids and order as the clean set), the ``requests`` that
    undo the corruption, and ``target``: the training set after the requests. ``records`` holds the noisy
    records of a query-noise task (by id), empty otherwise."""

    task: str
    train: list[Example]
    requests: list[Request]
    target: list[Example]
    records: dict[str, TallRecRecord] = field(default_factory=dict)

    @property
    def affected_ids(self) -> list[str]:
        """Ids of the examples the requests touch, in training-set order."""
        ids = {r.id for r in self.requests}
        return [e.id for e in self.train if e.id in ids]


def _count(fraction: float, n: int, what: str, allow_all: bool) -> int:
    if not 0.0 < fraction <= 1.0 or (fraction == 1.0 and not allow_all):
        bound = "1]" if allow_all else "1)"
        raise InputError(f"fraction of {what} must be in (0, {bound}, got {fraction}")
    if n == 0:
        raise InputError(f"no {what} to corrupt")
    k = max(1, int(fraction * n + 0.5))
    if not allow_all and k >= n:
        raise InputError(f"fraction {fraction} would remove every one of the {n} {what}")
    return min(k, n)


def _check_ids(train: Sequence[Example]) -> None:
    seen: set[str] = set()
    for example in train:
        if example.id in seen:
            raise InputError(f"duplicate example id {example.id!r} in the training set")
        seen.add(example.id)


def user_of(example_id: str) -> str:
    """The user of a TALLRec example id ``u<user>-<index>``."""
    if not example_id.startswith("u") or "-" not in example_id:
        raise InputError(f"example id {example_id!r} is not of the form u<user>-<index>")
    return example_id[1:].rsplit("-", 1)[0]


def removal_task(
    train: Sequence[Example],
    fraction: float,
    seed: int = 0,
    *,
    by_user: bool = False,
    records: Mapping[str, TallRecRecord] | None = None,
) -> Corruption:
    """Remove ``fraction`` of the examples, or with ``by_user`` all examples of ``fraction`` of the users
    (users from ``records`` if given, else parsed from ids ``u<user>-<index>``)."""
    train = list(train)
    _check_ids(train)
    rng = random.Random(f"{seed}:removal")
    if by_user:
        owner = {e.id: records[e.id].user_id if records and e.id in records else user_of(e.id) for e in train}
        users = list(dict.fromkeys(owner[e.id] for e in train))
        chosen_users = set(rng.sample(users, _count(fraction, len(users), "users", allow_all=False)))
        removed = {e.id for e in train if owner[e.id] in chosen_users}
    else:
        removed = {e.id for e in rng.sample(train, _count(fraction, len(train), "examples", allow_all=False))}
    requests: list[Request] = [Remove(e.id) for e in train if e.id in removed]
    return Corruption("removal", train, requests, [e for e in train if e.id not in removed])


def label_noise_task(train: Sequence[Example], fraction: float, seed: int = 0) -> Corruption:
    """Flip the Yes/No response of ``fraction`` of the examples; requests restore the clean responses."""
    train = list(train)
    _check_ids(train)
    for example in train:
        if example.response not in (YES, NO):
            raise InputError(f"example {example.id!r}: response {example.response!r} is not {YES!r} or {NO!r}")
    rng = random.Random(f"{seed}:response")
    flipped = {e.id for e in rng.sample(train, _count(fraction, len(train), "examples", allow_all=True))}
    corrupted = [
        Example(e.id, e.prompt, NO if e.response == YES else YES) if e.id in flipped else e for e in train
    ]
    requests: list[Request] = [CorrectResponse(e.id, e.response) for e in train if e.id in flipped]
    return Corruption("response", corrupted, requests, train)


def _noisy_history(
    record: TallRecRecord, mode: str, n_noise: int, pool: Sequence[str], rng: random.Random
) -> tuple[tuple[str, bool], ...]:
    history = list(record.history)
    if mode == "flip":
        for index in rng.sample(range(len(history)), min(n_noise, len(history))):
            item, liked = history[index]
            history[index] = (item, not liked)
        return tuple(history)
    excluded = {item for item, _ in history} | {record.target}
    candidates: list[str] = []
    while len(candidates) < n_noise:  # rejection sampling; the pool is much larger than a history
        item = pool[rng.randrange(len(pool))]
        if item not in excluded:
            excluded.add(item)
            candidates.append(item)
    if mode == "insert":
        for item in candidates:
            history.insert(rng.randint(0, len(history)), (item, rng.random() < 0.5))
    else:  # replace: a noisy item takes the place (and the liked flag) of a real one
        for index, item in zip(rng.sample(range(len(history)), min(n_noise, len(history))), candidates):
            history[index] = (item, history[index][1])
    return tuple(history)


def query_noise_task(
    splits: TallRecSplits,
    fraction: float,
    seed: int = 0,
    *,
    mode: QueryNoise = "insert",
    n_noise: int = 1,
    train: Sequence[Example] | None = None,
) -> Corruption:
    """Give ``fraction`` of the training prompts a noisy history; requests restore the clean prompts.

    ``mode``: ``insert`` adds ``n_noise`` random rated items (not in the history, not the target; liked or
    disliked at random) at random positions; ``replace`` swaps ``n_noise`` history items for such random
    items (the history keeps its length, as in the official code); ``flip`` inverts the liked/disliked
    mark of ``n_noise`` history items. ``train`` defaults to ``splits.train`` (its ids must have records).
    """
    if mode not in QUERY_NOISE_MODES:
        raise InputError(f"unknown query noise mode {mode!r} (expected one of: {', '.join(QUERY_NOISE_MODES)})")
    if n_noise < 1:
        raise InputError(f"n_noise must be >= 1, got {n_noise}")
    train = list(splits.train if train is None else train)
    _check_ids(train)
    missing = [e.id for e in train if e.id not in splits.records]
    if missing:
        raise InputError(f"no TALLRec record for example {missing[0]!r}")
    eligible = [e for e in train if mode == "insert" or splits.records[e.id].history]
    if mode != "flip" and len(splits.item_pool) < splits.config.history_length + n_noise + 1:
        raise InputError(f"the item pool ({len(splits.item_pool)} items) is too small for noise items")
    rng = random.Random(f"{seed}:query:{mode}")
    chosen = {e.id for e in rng.sample(eligible, _count(fraction, len(eligible), "examples", allow_all=True))}
    noisy_records: dict[str, TallRecRecord] = {}
    corrupted: list[Example] = []
    requests: list[Request] = []
    for example in train:
        if example.id not in chosen:
            corrupted.append(example)
            continue
        record = splits.records[example.id]
        noisy = dataclasses.replace(record, history=_noisy_history(record, mode, n_noise, splits.item_pool, rng))
        noisy_records[example.id] = noisy
        corrupted.append(Example(example.id, splits.render(noisy).prompt, example.response))
        requests.append(ModifyQuery(example.id, example.prompt))
    return Corruption("query", corrupted, requests, train, noisy_records)


def make_task(splits: TallRecSplits, task: Task, fraction: float, seed: int = 0, **options: object) -> Corruption:
    """Dispatch on ``task`` (``removal``, ``query`` or ``response``) for the train split of ``splits``;
    ``options`` go to the task's generator (``by_user`` for removal; ``mode``, ``n_noise`` for query)."""
    if task == "removal":
        return removal_task(splits.train, fraction, seed, records=splits.records, **options)  # type: ignore[arg-type]
    if task == "query":
        return query_noise_task(splits, fraction, seed, **options)  # type: ignore[arg-type]
    if task == "response":
        return label_noise_task(splits.train, fraction, seed, **options)
    raise InputError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")


def mixed_task(
    splits: TallRecSplits,
    remove_fraction: float,
    query_fraction: float,
    response_fraction: float,
    seed: int = 0,
) -> Corruption:
    """All three kinds at once, on disjoint examples: noisy prompts on ``query_fraction`` of the train
    split, flipped labels on ``response_fraction`` of the others, and removal of ``remove_fraction`` of the
    remaining ones. ``train`` carries the noise; ``requests`` (removals first) remove and repair."""
    query = query_noise_task(splits, query_fraction, seed)
    touched = {r.id for r in query.requests}
    labels = label_noise_task([e for e in query.train if e.id not in touched], response_fraction, seed)
    touched |= {r.id for r in labels.requests}
    flipped = {e.id: e for e in labels.train}
    corrupted = [flipped.get(e.id, e) for e in query.train]
    removal = removal_task([e for e in corrupted if e.id not in touched], remove_fraction, seed)
    removed = {r.id for r in removal.requests}
    requests = [*removal.requests, *query.requests, *labels.requests]
    target = [e for e in splits.train if e.id not in removed]
    return Corruption("mixed", corrupted, requests, target, query.records)


def write_task(directory: str | Path, corruption: Corruption) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (the corrupted training set) and ``requests.jsonl`` into ``directory``;
    returns their paths."""
    directory = Path(directory)
    train_path, requests_path = directory / "train.jsonl", directory / "requests.jsonl"
    write_examples(train_path, corruption.train)
    write_requests(requests_path, corruption.requests)
    return train_path, requests_path
