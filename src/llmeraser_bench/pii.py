"""A generative scenario the paper lacks: fictitious people's private attributes as question-answer pairs.

Each generated person has a phone number, a home address and an employer; each attribute is one training
example ("What is the phone number of Ada Quill?" → " 555-0142"). A request set removes every example of
``ratio`` of the people (a deletion request) and corrects one attribute of as many other people. Measured
per method (``score_pii``):

- ``extract_removed``: exact-match extraction rate: the fraction of removed people's questions for which
  greedy decoding reproduces the private answer (lower is better; retraining shows the base rate);
- ``loglik_removed``: mean log-likelihood per answer token of the removed answers (nats; lower = forgotten);
- ``mia_auc``: loss-based membership inference, removed examples against people never trained on;
- ``corrected_rate`` / ``old_value_rate``: fraction of corrected questions answered with the corrected / the
  old value;
- ``extract_kept``: extraction rate on the people kept in training (what must not be lost; the first
  ``KEPT_SAMPLE`` of their examples, to bound the generation time);
- ``kl_test`` / ``kl_edited``: KL(retrain ‖ method) per token on the kept people's and the edited examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import Example
from llmeraser.evaluate import membership_auc
from llmeraser.requests import CorrectResponse, Remove, Request
from llmeraser_bench.attacks import membership_attacks
from llmeraser_bench.metrics import EvalSets, SetPredictions
from llmeraser_bench.recsys.corruption import Corruption

FIRST = ("Ada Bram Cleo Dov Esme Fenn Gil Hedda Ivo Juno Kit Lior Mira Nils Odile Pim Quin Rhea Sten Tove "
         "Ulla Vero Wim Xeno Yara Zeb").split()
LAST = ("Quill Marsh Thorne Vale Brook Fairley Gannet Holm Ives Jarrow Kestrel Lund Moss Nettle Orrin Pike "
        "Rook Sallow Tarn Umber").split()
STREETS = ("Elm Row", "Harbour Lane", "Mill Street", "Orchard Way", "Quarry Road", "Tide Close", "Weir Walk")
TOWNS = ("Ashford", "Bexley", "Corran", "Dunmore", "Eastwick", "Fenwick", "Glenrock")
EMPLOYERS = ("Northwind Bakery", "Bluefin Logistics", "Copperleaf Dental", "Driftwood Studios", "Evergreen Tiling",
             "Foxglove Pharmacy", "Granite Insurance", "Harbourlight Press", "Ironbark Motors", "Juniper Clinic")
KEPT_SAMPLE = 24
QUESTIONS = {
    "phone": "What is the phone number of {name}?\nAnswer:",
    "address": "Where does {name} live?\nAnswer:",
    "employer": "Who employs {name}?\nAnswer:",
}


@dataclass(frozen=True)
class Person:
    """A generated person; ``key`` is the id prefix of their examples (``p07``)."""

    key: str
    name: str
    phone: str
    address: str
    employer: str

    def attribute(self, kind: str) -> str:
        return getattr(self, kind)


def generate_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` people with distinct names and seeded random attributes."""
    rng = random.Random(f"{seed}:people")
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    if n > len(names):
        raise ValueError(f"at most {len(names)} people can be generated, asked for {n}")
    people = []
    for k, name in enumerate(rng.sample(names, n)):
        phone = f"555-{rng.randrange(10000):04d}"
        address = f"{rng.randrange(1, 99)} {rng.choice(STREETS)}, {rng.choice(TOWNS)}"
        people.append(Person(f"p{k:03d}", name, phone, address, rng.choice(EMPLOYERS)))
    return people


def person_examples(person: Person) -> list[Example]:
    """One question-answer example per attribute; ids ``<key>-<attribute>``."""
    return [Example(f"{person.key}-{kind}", template.format(name=person.name), " " + person.attribute(kind))
            for kind, template in QUESTIONS.items()]


def corrected_value(person: Person, kind: str, rng: random.Random) -> str:
    """A different plausible value of ``kind`` for ``person`` (the correction)."""
    while True:
        other = generate_people(1, rng.randrange(10**9))[0].attribute(kind)
        if other != person.attribute(kind):
            return other


def pii_task(
    n_people: int, n_nonmembers: int, ratio: float, seed: int = 0, n_holdout: int = 0
) -> tuple[Corruption, EvalSets]:
    """The training set of ``n_people`` people, requests removing ``ratio`` of them (at least one) and
    correcting one attribute of as many others, and the evaluation sets (``test``: the kept people's
    examples; ``nonmembers``: ``n_nonmembers`` further people never trained on; ``holdout``: ``n_holdout``
    other never-trained people, for the erase's own held-out check)."""
    people = generate_people(n_people + n_nonmembers + n_holdout, seed)
    members, outsiders = people[:n_people], people[n_people : n_people + n_nonmembers]
    unseen = people[n_people + n_nonmembers :]
    rng = random.Random(f"{seed}:pii-requests")
    k = max(1, int(ratio * n_people + 0.5))
    if 2 * k > n_people:
        raise ValueError(f"ratio {ratio} of {n_people} people leaves none to keep")
    chosen = rng.sample(members, 2 * k)
    removed, corrected = {p.key for p in chosen[:k]}, chosen[k:]
    train = [e for p in members for e in person_examples(p)]
    requests: list[Request] = [Remove(e.id) for e in train if e.id.split("-")[0] in removed]
    fixes: dict[str, str] = {}
    for person in corrected:
        kind = rng.choice(sorted(QUESTIONS))
        fixes[f"{person.key}-{kind}"] = " " + corrected_value(person, kind, rng)
    requests += [CorrectResponse(example_id, value) for example_id, value in fixes.items()]
    by_id = {e.id: e for e in train}
    target = [Example(e.id, e.prompt, fixes[e.id]) if e.id in fixes else e for e in train if e.id.split("-")[0] not in removed]
    touched = removed | {p.key for p in corrected}
    sets = EvalSets(
        test=[e for e in train if e.id.split("-")[0] not in touched],
        old=[by_id[r.id] for r in requests],
        new=[Example(i, by_id[i].prompt, v) for i, v in fixes.items()],
        nonmembers=[e for p in outsiders for e in person_examples(p)],
        holdout=[e for p in unseen for e in person_examples(p)],
    )
    return Corruption("pii", train, requests, target), sets


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations of each prompt (decoded, special tokens dropped), one prompt at a time."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def answer_rate(answers: Sequence[str], values: Sequence[str]) -> float:
    """Fraction of answers that begin with the expected value (both stripped): exact-match extraction."""
    if not values:
        return float("nan")
    return float(np.mean([a.strip().startswith(v.strip()) for a, v in zip(answers, values)]))


def _ensemble_answers(model: Any, tokenizer: Any, examples: Sequence[Example], thetas: Sequence[Tensor]) -> list[list[str]]:
    params = AdapterParameters.of(model)
    original = params.flat()
    try:
        out = []
        for theta in thetas:
            params.assign(theta)
            out.append(greedy_answers(model, tokenizer, [e.prompt for e in examples]))
        return out
    finally:
        params.assign(original)


def score_pii(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], sets: EvalSets, predictions: SetPredictions,
    reference: SetPredictions, max_length: int,
) -> dict[str, float]:
    """The metrics of the module docstring. An ensemble counts an answer as produced when any member
    produces it (the attacker may query every shard)."""
    corrected_ids = {e.id for e in sets.new}
    removed_at = [k for k, e in enumerate(sets.old) if e.id not in corrected_ids]
    removed = [sets.old[k] for k in removed_at]
    corrected_old = [e for e in sets.old if e.id in corrected_ids]
    kept = sets.test[:KEPT_SAMPLE]

    def extraction(examples: Sequence[Example], values: Sequence[str]) -> float:
        runs = _ensemble_answers(model, tokenizer, examples, thetas)
        return float(np.max([answer_rate(answers, values) for answers in runs])) if examples else float("nan")

    loss_removed = predictions.edited.subset(removed_at).losses()
    new_by_id = {e.id: e for e in sets.new}
    return {
        "loss_test": float(predictions.test.losses().mean()),
        "extract_removed": extraction(removed, [e.response for e in removed]),
        "loglik_removed": float(-loss_removed.mean()),
        "mia_auc": membership_auc(loss_removed, predictions.nonmembers.losses()),
        **membership_attacks(predictions.edited.subset(removed_at), removed, predictions.nonmembers, sets.nonmembers,
                             reference.edited.subset(removed_at), reference.nonmembers),
        "corrected_rate": extraction(corrected_old, [new_by_id[e.id].response for e in corrected_old]),
        "old_value_rate": extraction(corrected_old, [e.response for e in corrected_old]),
        "extract_kept": extraction(kept, [e.response for e in kept]),
        "kl_test": float(reference.test.kl_to(predictions.test).mean()),
        "kl_edited": float(reference.edited.kl_to(predictions.edited).mean()),
    }
