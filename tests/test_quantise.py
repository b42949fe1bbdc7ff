"""The quantisation check (``bench.quantise``): rounding by hand, the merge, and a bit-exact restore."""

from __future__ import annotations

import pytest
import torch
from conftest import one_thread, perturbed_model, toy_examples

from llmeraser.evaluate import example_loss_values
from llmeraser_bench.quantise import lora_layers, quantise_rows, quantised_merged

TARGETS = ("q_proj", "v_proj", "lm_head")


def test_quantise_rows_by_hand() -> None:
    weight = torch.tensor([[0.4, -1.0, 0.1], [0.0, 0.0, 0.0], [2.0, -0.9, 0.5]], dtype=torch.float64)
    # 3 bits: 3 levels each side; row scales 1/3 and 2/3 (the zero row stays zero)
    expected = torch.tensor([[1 / 3, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, -2 / 3, 2 / 3]], dtype=torch.float64)
    torch.testing.assert_close(quantise_rows(weight, 3), expected)
    # 8 bits: 127 levels; 0.4 · 127 = 50.8 → 51, 0.1 · 127 = 12.7 → 13; −0.9 / (2/127) = −57.15 → −57
    eight = quantise_rows(weight, 8)
    assert eight[0].tolist() == pytest.approx([51 / 127, -1.0, 13 / 127])
    assert eight[2].tolist() == pytest.approx([2.0, -57 * 2 / 127, 32 * 2 / 127])
    assert quantise_rows(weight.float(), 4).dtype == torch.float32
    with pytest.raises(ValueError):
        quantise_rows(weight, 1)
    with pytest.raises(ValueError):
        quantise_rows(weight[0], 4)


def test_quantised_merged_model_and_exact_restore() -> None:
    model, tokenizer, params = perturbed_model(TARGETS, r=2, scale=0.1)
    examples = toy_examples(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with one_thread():
        adapted = example_loss_values(model, tokenizer, examples)
        with quantised_merged(model, None):  # merged, not rounded: the same function as base + adapter
            merged = example_loss_values(model, tokenizer, examples)
        with quantised_merged(model, 8):
            eight = example_loss_values(model, tokenizer, examples)
        with quantised_merged(model, 2):
            two = example_loss_values(model, tokenizer, examples)
        after = example_loss_values(model, tokenizer, examples)
    assert len(lora_layers(model)) == 5  # q, v in 2 layers + lm_head
    torch.testing.assert_close(torch.from_numpy(merged), torch.from_numpy(adapted), rtol=1e-9, atol=1e-9)
    small, large = abs(eight - adapted).max(), abs(two - adapted).max()
    assert small < 0.005 and large > 10 * small and large > 0.02
    for key, value in model.state_dict().items():  # every tensor back bit-exactly, flags as they were
        assert torch.equal(value, before[key]), key
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert (after == adapted).all()
