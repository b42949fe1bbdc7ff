"""Reading data files, tokenisation, batching and the per-example response loss."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exact_float64_llama, one_thread, tiny_lora_model

from llmeraser.data import (
    IGNORE_INDEX,
    Example,
    TokenizationConfig,
    collate,
    example_losses,
    read_examples,
    response_nll,
    tokenize_example,
    tokenize_examples,
    write_examples,
)
from llmeraser.errors import InputError
from llmeraser.models import build_byte_tokenizer


def write_lines(path, lines, encoding="utf-8"):
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def dumps(**obj):
    return json.dumps(obj)


@pytest.fixture(scope="module", autouse=True)
def float64_llama():
    """The tiny model computed fully in float64 (see curvature/test_operators.py), so padding checks can be tight."""
    with exact_float64_llama(), one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = tiny_lora_model(r=2, seed=3)
    # Move lora_B off zero so the adapter contributes to the logits.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in (t for _, t in model.named_parameters() if t.requires_grad):
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return model, tokenizer


# --- reading -------------------------------------------------------------------------------------------


def test_read_prompt_response(tmp_path):
    path = write_lines(tmp_path / "d.jsonl",
                       [dumps(id="a", prompt="P1", response="R1"), dumps(id="b", prompt="P2", response="R2")])
    assert read_examples(path) == [Example("a", "P1", "R1"), Example("b", "P2", "R2")]


def test_read_prompt_completion(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [dumps(id="a", prompt="P", completion="C")])
    assert read_examples(path) == [Example("a", "P", "C")]


def test_read_alpaca_layout(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            dumps(id="a", instruction="Do it", input="with this", output="done"),
            dumps(id="b", instruction="Just do it", input="", output="ok"),
            dumps(id="c", instruction="No input field", output="fine"),
        ],
    )
    assert read_examples(path) == [
        Example("a", "Do it\n\nwith this", "done"),
        Example("b", "Just do it", "ok"),
        Example("c", "No input field", "fine"),
    ]


def test_integer_ids_become_strings(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [dumps(id=7, prompt="P", response="R"), dumps(id="8", prompt="P", response="R")])
    assert [e.id for e in read_examples(path)] == ["7", "8"]


def test_write_read_round_trip(tmp_path):
    examples = [Example("a", "héllo\nworld", " Yes"), Example("b", 'quote " and \\', " No")]
    write_examples(tmp_path / "out.jsonl", examples)
    assert read_examples(tmp_path / "out.jsonl") == examples


def test_bom_and_crlf_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join([dumps(id="a", prompt="P1", response="R1"), "", dumps(id="b", prompt="P2", response="R2")]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert read_examples(path) == [Example("a", "P1", "R1"), Example("b", "P2", "R2")]


GOOD = dumps(id="a", prompt="P", response="R")


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"id": "x", "prompt": "P", "response": ', "malformed JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        (dumps(id="x", response="R"), "missing field 'prompt'"),
        (dumps(id="x", prompt="P"), "missing field 'response'"),
        (dumps(prompt="P", response="R"), "missing field 'id'"),
        (dumps(id="x", prompt=3, response="R"), "field 'prompt' must be a string"),
        (dumps(id="x", prompt="P", response=["R"]), "field 'response' must be a string"),
        (dumps(id=True, prompt="P", response="R"), "field 'id' must be a string"),
        (dumps(id="x", prompt="P", response="  "), "field 'response' is empty"),
        (dumps(id="x", instruction="I", input=5, output="O"), "field 'input' must be a string"),
        (dumps(id="x", instruction="I", input="in"), "missing field 'output'"),
        (dumps(id="a", prompt="P2", response="R2"), "duplicate id 'a' (first seen on line 1)"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", bad_line])
    with pytest.raises(InputError) as info:
        read_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert problem in message, message
    assert info.value.line == 3 and info.value.path == str(path)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"id": "b", "prompt": "caf\xe9", "response": "R"}\n')
    with pytest.raises(InputError, match=r"data\.jsonl:2: not valid UTF-8"):
        read_examples(path)


def test_empty_and_missing_files(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(InputError, match=r"empty\.jsonl: no examples"):
        read_examples(empty)
    with pytest.raises(InputError, match=r"missing\.jsonl: file not found"):
        read_examples(tmp_path / "missing.jsonl")


# --- tokenisation ----------------------------------------------------------------------------------------


def test_tokenisation_layout(tokenizer):
    config = TokenizationConfig(max_length=64)
    item = tokenize_example(tokenizer, Example("a", "Is it?", " Yes"), config)
    prompt_ids = tokenizer("Is it?", add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    assert list(item.input_ids) == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert item.prompt_length == len(prompt_ids) and not item.truncated
    no_eos = tokenize_example(tokenizer, Example("a", "Is it?", " Yes"), TokenizationConfig(64, append_eos=False))
    assert list(no_eos.input_ids) == prompt_ids + response_ids


def test_editing_one_side_keeps_the_other_sides_tokens(tokenizer):
    config = TokenizationConfig(max_length=64)
    base = tokenize_example(tokenizer, Example("a", "Will the user like X?", " Yes"), config)
    corrected = tokenize_example(tokenizer, Example("a", "Will the user like X?", " No"), config)
    requeried = tokenize_example(tokenizer, Example("a", "Will the user like Y then?", " Yes"), config)
    assert corrected.prompt_length == base.prompt_length
    assert corrected.input_ids[: corrected.prompt_length] == base.input_ids[: base.prompt_length]
    assert corrected.input_ids[corrected.prompt_length :] != base.input_ids[base.prompt_length :]
    assert requeried.input_ids[requeried.prompt_length :] == base.input_ids[base.prompt_length :]
    assert requeried.input_ids[: requeried.prompt_length] != base.input_ids[: base.prompt_length]


def test_long_prompt_is_cut_from_the_left(tokenizer):
    config = TokenizationConfig(max_length=16)
    prompt = "0123456789abcdefghijklmnopqrstuvwxyz"
    item = tokenize_example(tokenizer, Example("a", prompt, " Yes"), config)
    full_prompt = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response = tokenizer(" Yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item.truncated
    assert len(item.input_ids) == 16
    assert item.prompt_length == 16 - len(response)
    assert list(item.input_ids) == full_prompt[-item.prompt_length :] + response


def test_response_longer_than_max_length_raises(tokenizer):
    with pytest.raises(InputError, match="example 'long': response is .* tokens, max_length is 8"):
        tokenize_example(tokenizer, Example("long", "P", "a response that is far too long"), TokenizationConfig(8))


def test_collate_masks_prompt_and_padding(tokenizer):
    items = tokenize_examples(tokenizer, [Example("a", "Long prompt here", " Yes"), Example("b", "Hi", " No")],
                              TokenizationConfig(64))
    batch = collate(items, tokenizer.pad_token_id)
    lengths = [len(i.input_ids) for i in items]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, item in enumerate(items):
        n, p = lengths[row], item.prompt_length
        assert batch["input_ids"][row, :n].tolist() == list(item.input_ids)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, :p] == IGNORE_INDEX).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["labels"][row, p:n].tolist() == list(item.input_ids[p:])
        assert int(batch["answer_positions"][row]) == p - 1


# --- the per-example loss --------------------------------------------------------------------------------


def test_response_nll_is_the_manual_per_token_mean(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example("a", "Is 'red cat' nice?", " Yes"), Example("b", "Hm?", " No, not at all")]
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(64))
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = response_nll(logits, batch["labels"])
    assert losses.dtype == torch.float64
    for row, item in enumerate(items):
        log_probs = torch.log_softmax(logits[row], dim=-1)
        terms = [-log_probs[t - 1, item.input_ids[t]] for t in range(item.prompt_length, len(item.input_ids))]
        manual = torch.stack(terms).mean()
        assert torch.allclose(losses[row], manual, rtol=1e-12, atol=0), (float(losses[row]), float(manual))


def test_loss_alone_equals_loss_in_a_right_padded_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example("short", "Hi?", " Yes"), Example("long", "A much longer prompt than the other one?", " No")]
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(64))
    with torch.no_grad():
        together = example_losses(model, collate(items, tokenizer.pad_token_id))
        alone = torch.cat([example_losses(model, collate([item], tokenizer.pad_token_id)) for item in items])
    assert len(items[0].input_ids) < len(items[1].input_ids)  # the first one is padded in the batch
    assert torch.allclose(together, alone, rtol=1e-13, atol=0), (together, alone)


def test_prompt_tokens_do_not_count_but_condition(model_and_tokenizer):
    """Changing a prompt changes the loss (conditioning) but the loss only counts response tokens:
    a batch whose labels are masked except for the response gives the same number however long the prompt."""
    model, tokenizer = model_and_tokenizer
    items = tokenize_examples(tokenizer, [Example("a", "Question one?", " Yes")], TokenizationConfig(64))
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].clone()
    base = response_nll(logits, labels)
    # Garbage in the prompt logits must not matter: only positions predicting response tokens are read.
    corrupted = logits.clone()
    corrupted[:, : items[0].prompt_length - 1] = 1e3 * torch.randn_like(corrupted[:, : items[0].prompt_length - 1])
    assert torch.equal(response_nll(corrupted, labels), base)
