"""TALLRec-style yes/no recommendation examples (benchmarks/README.md, "`llmeraser bench`") from a :class:`RatingData`.

For each user, interactions are put in chronological order (file order when the data has no timestamps).
The example whose target is the user's t-th interaction (0-based) has the id ``u<user>-<t>``, lists the
``history_length`` interactions before it (oldest first, each liked or disliked) and asks whether the user
likes the target; the response is ``" Yes"`` or ``" No"`` with a leading space, so that the first response
token is the answer token. Prompt layout (``render_prompt``)::

    A user's past movies, oldest first, each liked or disliked:
    - "Toy Story (1995)": liked
    - "GoldenEye (1995)": disliked
    Will the user like "Heat (1995)"? Answer Yes or No.
    Answer:

Split (per user, by time): of a user's examples in chronological order, the last ``test_fraction`` go to
test, the ``valid_fraction`` before them to validation, the rest to train; a user's share ``n·f`` is
rounded up or down at random (seeded), so the overall fractions hold in expectation even for users with
few examples. A test example's target is thus never earlier than a train example's target *of the same
user*; different users are not aligned in time.

Everything random is seeded per user from ``config.seed`` (string seeds, hashed with SHA-512 by
``random.Random``), so a user's examples do not change when ``max_users`` adds or drops other users.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser_bench.recsys.ratings import (
    RatingData,
    bulk_allocation,
    default_ml100k_path,
    load_ratings,
    natural_key,
    placeholder_title,
)

YES = " Yes"
NO = " No"
SPLITS = ("train", "valid", "test")
USER_MEDIAN = "user_median"

_PLURALS = {"movie": "movies", "book": "books", "artist": "artists", "item": "items"}


@dataclass(frozen=True)
class TallRecConfig:
    """How examples are built.

    ``history_length``: number of previous interactions shown in a prompt (the most recent ones).
    ``min_history``: an interaction becomes an example target only if the user has at least this many
    earlier interactions (None: ``history_length``, i.e. every prompt has a full history).
    ``like_threshold``: liked iff rating > threshold; ``"user_median"``: liked iff above the user's median
    rating (computed over all the user's interactions; the default for play counts); None: the data set's
    default (``RatingData.scale.like_above``: 3 on 5-star scales, 5 on BookCrossing's 1-10 scale).
    ``max_users``: keep a seeded random subset of the eligible users. ``max_examples_per_user``: keep a
    seeded random subset of a user's example positions (in time order) before splitting.
    ``valid_fraction`` / ``test_fraction``: per-user shares of the latest examples (see module docstring).
    ``balanced``: subsample each split so it has as many Yes as No examples.
    ``item_noun``: what the items are called in prompts (None: the data set's ``item_noun``).
    """

    history_length: int = 10
    min_history: int | None = None
    like_threshold: float | str | None = None
    max_users: int | None = None
    max_examples_per_user: int | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    balanced: bool = False
    seed: int = 0
    item_noun: str | None = None

    def validate(self) -> None:
        """Raise ``InputError`` for out-of-range settings."""
        if self.history_length < 1:
            raise InputError(f"history_length must be >= 1, got {self.history_length}")
        if self.min_history is not None and self.min_history < 0:
            raise InputError(f"min_history must be >= 0, got {self.min_history}")
        if isinstance(self.like_threshold, str) and self.like_threshold != USER_MEDIAN:
            raise InputError(f"like_threshold must be a number, {USER_MEDIAN!r} or None, got {self.like_threshold!r}")
        for name in ("max_users", "max_examples_per_user"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 or None, got {value}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise InputError("valid_fraction + test_fraction must be < 1")


@dataclass(frozen=True)
class TallRecRecord:
    """The structured form of one example, from which its prompt is rendered.

    ``history``: ``(item_id, liked)`` pairs, oldest first. ``label``: whether the user liked ``target``.
    ``timestamp``: the target interaction's time (seconds, or file position for data without times).
    """

    id: str
    user_id: str
    history: tuple[tuple[str, bool], ...]
    target: str
    label: bool
    timestamp: int
    split: str


@dataclass
class TallRecSplits:
    """Rendered examples per split, and the records and titles they were rendered from.

    ``records`` maps every example id (all splits) to its record; ``item_pool`` lists the items of the
    data set that users rated (natural order), the pool for random noise items.
    """

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    records: dict[str, TallRecRecord]
    item_titles: dict[str, str]
    item_noun: str
    item_pool: tuple[str, ...] = ()
    config: TallRecConfig = field(default_factory=TallRecConfig)

    def examples(self, split: str) -> list[Example]:
        """The examples of ``split`` (``train``, ``valid`` or ``test``)."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
        return getattr(self, split)

    def records_of(self, split: str) -> list[TallRecRecord]:
        """The records of ``split``, in the order of its examples."""
        return [self.records[e.id] for e in self.examples(split)]

    def render(self, record: TallRecRecord) -> Example:
        """Render a (possibly edited) record with this data set's titles and noun."""
        return render_example(record, self.item_titles, self.item_noun)


def response_text(label: bool) -> str:
    """``" Yes"`` for liked, ``" No"`` otherwise."""
    return YES if label else NO


def render_prompt(
    history: Sequence[tuple[str, bool]], target: str, item_titles: Mapping[str, str], item_noun: str = "item"
) -> str:
    """The prompt for a history of ``(item_id, liked)`` pairs (oldest first) and a target item id."""

    def title(item_id: str) -> str:
        return item_titles.get(item_id, placeholder_title(item_id))

    plural = _PLURALS.get(item_noun, f"{item_noun}s")
    if history:
        lines = [f"A user's past {plural}, oldest first, each liked or disliked:"]
        lines += [f'- "{title(item)}": {"liked" if liked else "disliked"}' for item, liked in history]
    else:
        lines = [f"A user with no past {plural}."]
    lines.append(f'Will the user like "{title(target)}"? Answer Yes or No.')
    lines.append("Answer:")
    return "\n".join(lines)


def render_example(record: TallRecRecord, item_titles: Mapping[str, str], item_noun: str = "item") -> Example:
    """The :class:`Example` of a record."""
    return Example(
        record.id, render_prompt(record.history, record.target, item_titles, item_noun), response_text(record.label)
    )


def _round_random(value: float, rng: random.Random) -> int:
    whole = int(value)
    return whole + (1 if rng.random() < value - whole else 0)


def build_records(data: RatingData, config: TallRecConfig = TallRecConfig()) -> dict[str, list[TallRecRecord]]:
    """The records of each split (``{"train": [...], "valid": [...], "test": [...]}``), users in natural
    order, each user's records in time order. No prompt is rendered."""
    config.validate()
    with bulk_allocation():
        return _build_records(data, config)


def _build_records(data: RatingData, config: TallRecConfig) -> dict[str, list[TallRecRecord]]:
    min_history = config.history_length if config.min_history is None else config.min_history
    rule = config.like_threshold if config.like_threshold is not None else data.scale.like_above
    if rule is None:
        rule = USER_MEDIAN

    by_user = {u: seq for u, seq in data.by_user().items() if len(seq) > min_history}
    users = list(by_user)
    if not users:
        raise InputError(f"no user of {data.name!r} has more than {min_history} interactions")
    if config.max_users is not None and config.max_users < len(users):
        users = sorted(random.Random(f"{config.seed}:users").sample(users, config.max_users), key=natural_key)

    splits: dict[str, list[TallRecRecord]] = {name: [] for name in SPLITS}
    for user in users:
        sequence = by_user[user]
        if rule == USER_MEDIAN:
            median = statistics.median(i.rating for i in sequence)
            liked = [i.rating > median for i in sequence]
        else:
            liked = [i.rating > float(rule) for i in sequence]
        pairs = [(i.item_id, flag) for i, flag in zip(sequence, liked)]
        positions = list(range(min_history, len(sequence)))
        if config.max_examples_per_user is not None and config.max_examples_per_user < len(positions):
            rng = random.Random(f"{config.seed}:{user}:examples")
            positions = sorted(rng.sample(positions, config.max_examples_per_user))
        rng = random.Random(f"{config.seed}:{user}:split")
        n_test = _round_random(len(positions) * config.test_fraction, rng)
        n_valid = min(_round_random(len(positions) * config.valid_fraction, rng), len(positions) - n_test)
        n_train = len(positions) - n_test - n_valid
        for rank, t in enumerate(positions):
            split = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
            start = max(0, t - config.history_length)
            history = tuple(pairs[start:t])
            target = sequence[t]
            splits[split].append(
                TallRecRecord(f"u{user}-{t}", user, history, target.item_id, liked[t], target.timestamp, split)
            )
    if config.balanced:
        for name in SPLITS:
            splits[name] = _balance(splits[name], random.Random(f"{config.seed}:balance:{name}"), name)
    return splits


def _balance(records: list[TallRecRecord], rng: random.Random, split: str) -> list[TallRecRecord]:
    """Downsample the majority label to the minority's count; order kept."""
    if not records:
        return records
    yes = [r.id for r in records if r.label]
    no = [r.id for r in records if not r.label]
    if not yes or not no:
        raise InputError(f"cannot balance the {split} split: it has only {'Yes' if yes else 'No'} examples")
    small, large = (yes, no) if len(yes) <= len(no) else (no, yes)
    keep = set(small) | set(rng.sample(large, len(small)))
    return [r for r in records if r.id in keep]


def rated_items(data: RatingData) -> tuple[str, ...]:
    """Distinct rated item ids in natural order."""
    return tuple(sorted({i.item_id for i in data.interactions}, key=natural_key))


def splits_from_records(
    records: Mapping[str, Iterable[TallRecRecord]],
    data: RatingData,
    config: TallRecConfig = TallRecConfig(),
    item_pool: tuple[str, ...] | None = None,
) -> TallRecSplits:
    """Render records (``{"train": ..., "valid": ..., "test": ...}``) into :class:`TallRecSplits`."""
    noun = config.item_noun or data.item_noun
    rendered: dict[str, list[Example]] = {}
    by_id: dict[str, TallRecRecord] = {}
    for name in SPLITS:
        rendered[name] = []
        for record in records.get(name, ()):
            if record.id in by_id:
                raise InputError(f"duplicate example id {record.id!r}")
            by_id[record.id] = record
            rendered[name].append(render_example(record, data.item_titles, noun))
    return TallRecSplits(
        train=rendered["train"],
        valid=rendered["valid"],
        test=rendered["test"],
        records=by_id,
        item_titles=data.item_titles,
        item_noun=noun,
        item_pool=rated_items(data) if item_pool is None else item_pool,
        config=config,
    )


def build_tallrec(data: RatingData, config: TallRecConfig = TallRecConfig()) -> TallRecSplits:
    """TALLRec examples (train/valid/test) and their records from a rating data set."""
    return splits_from_records(build_records(data, config), data, config)


RecordT = TypeVar("RecordT")  # a TALLRec or a next-item record


def subsample_records(
    records: Mapping[str, Sequence[RecordT]], counts: Mapping[str, int], seed: int = 0
) -> dict[str, list[RecordT]]:
    """A seeded random subset of ``counts[split]`` records per split (all when fewer), order kept."""
    chosen: dict[str, list[RecordT]] = {}
    for name in SPLITS:
        pool = list(records.get(name, ()))
        want = counts.get(name, len(pool))
        if want < len(pool):
            keep = set(random.Random(f"{seed}:subsample:{name}").sample(range(len(pool)), want))
            pool = [r for k, r in enumerate(pool) if k in keep]
        chosen[name] = pool
    return chosen


def sample_tallrec(
    n_train: int,
    n_valid_or_test: int,
    history_length: int = 10,
    seed: int = 0,
    *,
    path: str | Path | None = None,
    format: str | None = None,
    n_valid: int | None = None,
) -> TallRecSplits:
    """A small TALLRec set from rating data at ``path`` (MovieLens-100k shipped in ``recbole`` when None;
    ``format`` as in :func:`load_ratings`, detected when None): ``n_train`` train examples and
    ``n_valid_or_test`` examples in each of valid and test, drawn at random (seeded) from the per-user time
    split of all users (liked/disliked by the data set's threshold); ``n_valid`` overrides the valid count."""
    source = path if path is not None else default_ml100k_path()
    data = load_ratings(source, format)
    config = TallRecConfig(history_length=history_length, seed=seed)
    records = build_records(data, config)
    counts = {"train": n_train, "valid": n_valid_or_test if n_valid is None else n_valid, "test": n_valid_or_test}
    for name, want in counts.items():
        if want > len(records[name]):
            raise InputError(f"{source}: asked for {want} {name} examples; the data gives {len(records[name])}")
    return splits_from_records(subsample_records(records, counts, seed), data, config)


def movielens_demo_examples(
    n_train: int = 64,
    n_valid_or_test: int = 32,
    history_length: int = 10,
    seed: int = 0,
    *,
    path: str | Path | None = None,
) -> TallRecSplits:
    """:func:`sample_tallrec` on MovieLens-100k (the copy shipped in ``recbole`` unless ``path`` is given)."""
    return sample_tallrec(n_train, n_valid_or_test, history_length, seed, path=path)
