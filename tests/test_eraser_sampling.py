"""The curvature sample of an erase always holds the edited examples (``eraser.curvature_sample``)."""

from __future__ import annotations

from conftest import toy_examples

from llmeraser.eraser import EraseConfig, curvature_sample, prepare_erasure
from llmeraser.models import build_byte_tokenizer
from llmeraser.requests import CorrectResponse, ModifyQuery, Remove


def test_sample_contains_every_edited_example_and_is_seeded() -> None:
    examples = toy_examples(30)
    edited = {"ex3", "ex17", "ex29"}
    sample = curvature_sample(examples, edited, 8, seed=0)
    ids = [e.id for e in sample]
    assert len(sample) == 8 and edited <= set(ids)
    assert ids == sorted(ids, key=lambda i: int(i[2:]))  # in the data's order
    assert sample == curvature_sample(examples, edited, 8, seed=0) != curvature_sample(examples, edited, 8, seed=1)
    assert len(curvature_sample(examples, set(), 8, seed=0)) == 8


def test_prepare_erasure_samples_the_replacements_into_the_curvature_set() -> None:
    tokenizer = build_byte_tokenizer()
    train = toy_examples(30)
    requests = [Remove("ex1"), ModifyQuery("ex4", "Is it nice?"), CorrectResponse("ex9", " Maybe")]
    _, _, _, curvature = prepare_erasure(tokenizer, train, requests, EraseConfig(curvature_examples=5))
    by_id = {e.id: e for e in curvature.examples}
    assert len(by_id) == 5 and "ex1" not in by_id  # "retrain" scaling: the edited set, without the removal
    assert by_id["ex4"].prompt == "Is it nice?" and by_id["ex9"].response == " Maybe"
