"""LLaRA-style next-item examples (the paper's query-modification task) from a :class:`RatingData`.

For each user, interactions in chronological order; the example whose target is the user's t-th interaction
(0-based, t ≥ ``min_history``) has the id ``u<user>-<t>``, lists the up-to-``history_length`` items before it
(oldest first, by title) and ``n_candidates`` candidate titles: the true next item and ``n_candidates − 1``
negatives drawn from the items of the data set the user never rated. The draw is seeded per example
(``<seed>:<user>:<t>:candidates``) and stored in the record, so the candidates are fixed per example (never
re-sampled per read) and do not change when other users are added or dropped; the candidates are shuffled by
the same draw. The response is the chosen title with a leading space. Prompt layout (``render_prompt``)::

    A user watched these movies, oldest first:
    - "Toy Story (1995)"
    - "GoldenEye (1995)"
    Which movie will the user watch next? Choose exactly one of these 20 movies:
    - "Heat (1995)"
    - ...
    Answer:

The per-user time split is TALLRec's (``recsys.tallrec``): the last ``test_fraction`` of a user's examples go
to test, a user's share rounded at random (seeded).

Scoring by greedy decoding (``parse_choice``, ``hit_ratio_at_1``): the output's first line, case-folded with
runs of whitespace collapsed, *names* a candidate when it contains the candidate's title (case-folded, the same
whitespace) as a substring; the answer is **valid** when it names exactly one candidate, and a **hit** when that
one is the true item. HitRatio@1 = hits / examples, the valid-answer ratio = valid answers / examples (an
invalid answer is a miss).

Query modification (``next_item_query_task``), as in the paper's official code: ``replace`` swaps ``n_noise``
history items of ``fraction`` of the training prompts for random items the user never rated (not among the
candidates), and the requests restore the clean prompts; ``delete`` trains on the full histories and the
requests delete ``n_noise`` history items from the prompts (the user withdraws those interactions).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from llmeraser.data import Example
from llmeraser.errors import InputError
from llmeraser.requests import ModifyQuery, Request
from llmeraser_bench.recsys.corruption import Corruption, _count
from llmeraser_bench.recsys.ratings import RatingData, default_ml100k_path, load_ratings, natural_key, placeholder_title
from llmeraser_bench.recsys.tallrec import _PLURALS, _round_random, rated_items, subsample_records

NextItemMode = Literal["replace", "delete"]
NEXT_ITEM_MODES: tuple[str, ...] = get_args(NextItemMode)


@dataclass(frozen=True)
class NextItemRecord:
    """One example's structure: ``history`` item ids (oldest first), the true ``target``, and the shuffled
    ``candidates`` (the target exactly once)."""

    id: str
    user_id: str
    history: tuple[str, ...]
    target: str
    candidates: tuple[str, ...]
    timestamp: int
    split: str


def sample_candidates(
    target: str, rated: set[str], pool: Sequence[str], n_candidates: int, rng: random.Random
) -> tuple[str, ...]:
    """``target`` and ``n_candidates − 1`` distinct items of ``pool`` not in ``rated``, shuffled by ``rng``."""
    unrated = [item for item in pool if item not in rated and item != target]
    if len(unrated) < n_candidates - 1:
        raise InputError(f"only {len(unrated)} unrated items to draw {n_candidates - 1} negative candidates from")
    candidates = [target, *rng.sample(unrated, n_candidates - 1)]
    rng.shuffle(candidates)
    return tuple(candidates)


def build_next_item_records(
    data: RatingData, history_length: int = 10, n_candidates: int = 20, seed: int = 0, min_history: int = 1,
    test_fraction: float = 0.2, draw_candidates: bool = True,
) -> dict[str, list[NextItemRecord]]:
    """The records of each split (``{"train": [...], "valid": [], "test": [...]}``), users in natural order,
    each user's records in time order. ``draw_candidates=False`` leaves the candidates empty, to be drawn for
    the records kept (``with_candidates``: the same draw, which depends on the example alone)."""
    if history_length < 1 or min_history < 1 or n_candidates < 2 or not 0.0 <= test_fraction < 1.0:
        raise InputError("history_length, min_history ≥ 1, n_candidates ≥ 2 and test_fraction in [0, 1) required")
    splits: dict[str, list[NextItemRecord]] = {"train": [], "valid": [], "test": []}
    for user, sequence in sorted(data.by_user().items(), key=lambda pair: natural_key(pair[0])):
        if len(sequence) <= min_history:
            continue
        positions = list(range(min_history, len(sequence)))
        n_test = _round_random(len(positions) * test_fraction, random.Random(f"{seed}:{user}:split"))
        for rank, t in enumerate(positions):
            split = "train" if rank < len(positions) - n_test else "test"
            history = tuple(i.item_id for i in sequence[max(0, t - history_length) : t])
            splits[split].append(NextItemRecord(f"u{user}-{t}", user, history, sequence[t].item_id, (),
                                                sequence[t].timestamp, split))
    if draw_candidates:
        splits = {name: with_candidates(records, data, n_candidates, seed) for name, records in splits.items()}
    return splits


def with_candidates(
    records: Sequence[NextItemRecord], data: RatingData, n_candidates: int = 20, seed: int = 0
) -> list[NextItemRecord]:
    """The records with their candidates drawn (module docstring: seeded by ``seed``, the user and the position)."""
    pool = rated_items(data)
    rated: dict[str, set[str]] = {}
    for interaction in data.interactions:
        rated.setdefault(interaction.user_id, set()).add(interaction.item_id)
    out = []
    for record in records:
        position = record.id.rsplit("-", 1)[1]
        rng = random.Random(f"{seed}:{record.user_id}:{position}:candidates")
        out.append(dataclasses.replace(record, candidates=sample_candidates(record.target, rated[record.user_id], pool,
                                                                            n_candidates, rng)))
    return out


def render_prompt(
    history: Sequence[str], candidates: Sequence[str], item_titles: Mapping[str, str], item_noun: str = "movie"
) -> str:
    """The prompt of the module docstring."""

    def title(item_id: str) -> str:
        return item_titles.get(item_id, placeholder_title(item_id))

    plural = _PLURALS.get(item_noun, f"{item_noun}s")
    lines = [f"A user watched these {plural}, oldest first:", *(f'- "{title(i)}"' for i in history)] if history else [
        f"A user with no past {plural}."]
    lines.append(f"Which {item_noun} will the user watch next? Choose exactly one of these {len(candidates)} {plural}:")
    lines += [f'- "{title(i)}"' for i in candidates]
    lines.append("Answer:")
    return "\n".join(lines)


def render_example(record: NextItemRecord, item_titles: Mapping[str, str], item_noun: str = "movie") -> Example:
    """The :class:`Example` of a record; the response is ``" " + title(target)``."""
    title = item_titles.get(record.target, placeholder_title(record.target))
    return Example(record.id, render_prompt(record.history, record.candidates, item_titles, item_noun), " " + title)


@dataclass
class NextItemSplits:
    """Rendered train/test examples, the records (by id) and the titles they were rendered from."""

    train: list[Example]
    test: list[Example]
    records: dict[str, NextItemRecord]
    item_titles: dict[str, str]
    item_noun: str
    item_pool: tuple[str, ...]

    def render(self, record: NextItemRecord) -> Example:
        return render_example(record, self.item_titles, self.item_noun)

    def candidate_titles(self, example_id: str) -> list[str]:
        return [self.item_titles.get(i, placeholder_title(i)) for i in self.records[example_id].candidates]

    def target_title(self, example_id: str) -> str:
        target = self.records[example_id].target
        return self.item_titles.get(target, placeholder_title(target))


def sample_next_item(
    n_train: int, n_test: int, history_length: int = 10, seed: int = 0, *, n_candidates: int = 20,
    path: str | Path | None = None, format: str | None = None,
) -> NextItemSplits:
    """``n_train`` train and ``n_test`` test examples drawn at random (seeded) from the per-user time split of
    the rating data at ``path`` (MovieLens-100k shipped in ``recbole`` when None)."""
    source = path if path is not None else default_ml100k_path()
    data = load_ratings(source, format)
    records = build_next_item_records(data, history_length, n_candidates, seed, draw_candidates=False)
    for name, want in (("train", n_train), ("test", n_test)):
        if want > len(records[name]):
            raise InputError(f"{source}: asked for {want} {name} examples; the data gives {len(records[name])}")
    chosen = subsample_records(records, {"train": n_train, "valid": 0, "test": n_test}, seed)
    chosen = {name: with_candidates(records, data, n_candidates, seed) for name, records in chosen.items()}
    noun = "movie" if data.item_noun == "item" else data.item_noun
    by_id = {r.id: r for name in ("train", "test") for r in chosen[name]}
    return NextItemSplits([render_example(r, data.item_titles, noun) for r in chosen["train"]],
                          [render_example(r, data.item_titles, noun) for r in chosen["test"]],
                          by_id, data.item_titles, noun, rated_items(data))


def next_item_query_task(
    splits: NextItemSplits, fraction: float, seed: int = 0, *, mode: str = "replace", n_noise: int = 1,
    train: Sequence[Example] | None = None,
) -> Corruption:
    """The query modification of the module docstring on ``fraction`` of the training examples with a history."""
    if mode not in NEXT_ITEM_MODES:
        raise InputError(f"unknown next-item query mode {mode!r} (expected one of: {', '.join(NEXT_ITEM_MODES)})")
    train = list(splits.train if train is None else train)
    eligible = [e for e in train if len(splits.records[e.id].history) > (1 if mode == "delete" else 0)]
    rng = random.Random(f"{seed}:next-item:{mode}")
    chosen = {e.id for e in rng.sample(eligible, _count(fraction, len(eligible), "examples", allow_all=True))}
    corrupted: list[Example] = []
    target: list[Example] = []
    requests: list[Request] = []
    for example in train:
        if example.id not in chosen:
            corrupted.append(example)
            target.append(example)
            continue
        record = splits.records[example.id]
        history = list(record.history)
        positions = rng.sample(range(len(history)), min(n_noise, len(history) - (1 if mode == "delete" else 0)))
        if mode == "replace":
            excluded = set(history) | set(record.candidates)
            for position in positions:
                while (item := splits.item_pool[rng.randrange(len(splits.item_pool))]) in excluded:
                    pass
                excluded.add(item)
                history[position] = item
            corrupted.append(splits.render(dataclasses.replace(record, history=tuple(history))))
            target.append(example)
            requests.append(ModifyQuery(example.id, example.prompt))
        else:
            kept = tuple(item for k, item in enumerate(history) if k not in set(positions))
            edited = splits.render(dataclasses.replace(record, history=kept))
            corrupted.append(example)
            target.append(edited)
            requests.append(ModifyQuery(example.id, edited.prompt))
    return Corruption("next-item", corrupted, requests, target)


_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.casefold()).strip()


def parse_choice(output: str, candidates: Sequence[str]) -> int | None:
    """The index of the one candidate the output's first line names (module docstring), None when it names
    none or several."""
    line = _norm(output.strip().split("\n", 1)[0]) if output.strip() else ""
    named = [k for k, title in enumerate(candidates) if _norm(title) and _norm(title) in line]
    return named[0] if len(named) == 1 else None


def hit_ratio_at_1(outputs: Sequence[str], candidates: Sequence[Sequence[str]], targets: Sequence[str]) -> dict[str, float]:
    """``hr1`` (hits / examples) and ``valid_ratio`` (valid answers / examples) of greedy outputs."""
    if not outputs:
        return {"hr1": float("nan"), "valid_ratio": float("nan")}
    choices = [parse_choice(o, c) for o, c in zip(outputs, candidates)]
    hits = [k is not None and c[k] == t for k, c, t in zip(choices, candidates, targets)]
    return {"hr1": sum(hits) / len(outputs), "valid_ratio": sum(k is not None for k in choices) / len(outputs)}


def candidate_titles_of(prompt: str) -> list[str]:
    """The candidate titles listed in a prompt rendered by ``render_prompt`` (the lines after "Choose")."""
    lines = prompt.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith("Which ") and "Choose exactly one" in line), None)
    if start is None:
        raise InputError("not a next-item prompt: no candidate list")
    return [line[3:-1] for line in lines[start + 1 :] if line.startswith('- "') and line.endswith('"')]
