"""Shared fixtures: the tiny random-init model (float64 for tight numerical comparisons) and toy data."""

from __future__ import annotations

import random

import pytest
import torch

from llmeraser.data import Example
from llmeraser.model import LoraSettings, attach_lora, load_base_model

WORDS = "red green blue cat dog fish one two three sun moon star tree rock leaf".split()


def toy_examples(n: int, seed: int = 0) -> list[Example]:
    """n short prompt/response pairs with Yes/No answers, deterministic by seed."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        answer = " Yes" if rng.random() < 0.5 else " No"
        examples.append(Example(f"ex{i}", f"Is '{words}' nice?", answer))
    return examples


def tiny_lora_model(
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64
):
    """(peft_model, tokenizer) on the tiny model."""
    base, tokenizer = load_base_model("tiny", seed=seed, dtype=dtype)
    model = attach_lora(base, LoraSettings(r=r, alpha=2.0 * r, target_modules=target_modules, seed=seed))
    return model, tokenizer


@pytest.fixture
def tiny_model():
    return tiny_lora_model()
