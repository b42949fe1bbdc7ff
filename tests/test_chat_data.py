"""Conversational data: reading the chat layouts, chat-template tokenisation (checked against TRL's own
``SFTTrainer`` preprocessing), loss scopes, truncation, turn-addressed edits and hashing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import exact_float64_llama, one_thread, tiny_lora_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmeraser.chat import Message
from llmeraser.data import (
    IGNORE_INDEX,
    Example,
    FitError,
    TokenizationConfig,
    collate,
    example_losses,
    examples_from_rows,
    read_examples,
    tokenize_example,
    tokenize_examples,
    write_examples,
)
from llmeraser.errors import InputError
from llmeraser.hashing import dataset_hash, example_hash
from llmeraser.models import build_byte_tokenizer
from llmeraser.requests import CorrectResponse, ModifyQuery, read_requests, resolve
from llmeraser.validate import check_examples_fit

# SmolLM2-135M-Instruct's template (ChatML; a default system line when the conversation has none).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same, with TRL's {% generation %} markers around each assistant turn's content and end of turn.
CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Marks the last message: rendering a prefix of a conversation is not a prefix of rendering all of it.
NOT_PREFIX_CONSISTENT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if loop.last %}<last>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Is it red?"},
    {"role": "assistant", "content": "Yes"},
]


def msgs(rows):
    return tuple(Message(m["role"], m["content"]) for m in rows)


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def text_of(tokenizer, ids):
    return tokenizer.decode(list(ids))


def loss_text(tokenizer, item):
    """The text of the tokens that carry the loss (byte tokens: concatenated in order)."""
    return text_of(tokenizer, [item.input_ids[i] for i in item.loss_positions()])


# --- reading -------------------------------------------------------------------------------------------


def test_read_the_chat_layouts(tmp_path):
    sharegpt = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]
    path = write_lines(tmp_path / "chat.jsonl", [
        {"id": "m", "messages": TWO_TURNS},
        {"id": "c", "conversations": TWO_TURNS[:2]},
        {"id": "s", "conversations": sharegpt},
        {"id": "pc", "prompt": TWO_TURNS[:3], "completion": TWO_TURNS[3:]},
        {"id": "plain", "prompt": "P", "completion": "C"},
    ])
    m, c, s, pc, plain = read_examples(path)
    assert m.messages == msgs(TWO_TURNS) and m.prompt_turns is None
    assert (m.prompt, m.response) == ("Is it red?", "Yes")  # views: last user turn before the last assistant turn
    assert c.messages == s.messages == msgs(TWO_TURNS[:2])  # ShareGPT's human/gpt become user/assistant
    assert pc.messages == msgs(TWO_TURNS) and pc.prompt_turns == 3
    assert plain == Example("plain", "P", "C") and not plain.is_conversation
    assert pc.to_json() == {"id": "pc", "prompt": TWO_TURNS[:3], "completion": TWO_TURNS[3:]}


def test_write_read_round_trip_of_conversations(tmp_path):
    examples = [Example.conversation("m", msgs(TWO_TURNS)), Example.conversation("pc", msgs(TWO_TURNS), 3),
                Example("p", "prompt", "response")]
    write_examples(tmp_path / "out.jsonl", examples)
    assert read_examples(tmp_path / "out.jsonl") == examples


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"id": "x", "messages": "hello"}, "field 'messages' must be a list of messages, got str"),
        ({"id": "x", "messages": []}, "field 'messages' is an empty list of messages"),
        ({"id": "x", "messages": [{"role": "user"}]}, "field 'messages' message 0: missing 'content'"),
        ({"id": "x", "messages": [{"role": "user", "content": 3}]}, "field 'messages' message 0: 'content' must be a string"),
        ({"id": "x", "messages": [{"role": "user", "content": "a"}, "b"]}, "field 'messages' message 1 must be an object"),
        ({"id": "x", "messages": [{"role": "user", "content": "a"}]}, "field 'messages' has no assistant turn"),
        ({"id": "x", "messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "unsupported key(s) 'tool_calls'"),
        ({"id": "x", "conversations": [{"from": "human"}]}, "field 'conversations' message 0: missing 'value'"),
        ({"id": "x", "prompt": TWO_TURNS[:1]}, "missing field 'completion'"),
        ({"id": "x", "prompt": TWO_TURNS[:1], "completion": "Yes"}, "field 'completion' must be a list of messages"),
        ({"id": "x", "prompt": TWO_TURNS[:1], "completion": TWO_TURNS[:1]}, "field 'completion' has no assistant turn"),
        ({"id": "x", "messages": TWO_TURNS, "conversations": TWO_TURNS}, "both 'messages' and 'conversations'"),
    ],
)
def test_bad_chat_rows_name_file_line_and_field(tmp_path, row, problem):
    path = write_lines(tmp_path / "chat.jsonl", [{"id": "ok", "messages": TWO_TURNS}, row])
    with pytest.raises(InputError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:2: ") and problem in str(info.value), str(info.value)


# --- tokenisation: the chat template -------------------------------------------------------------------


def test_messages_tokens_are_the_template_rendering_and_the_loss_is_the_last_assistant_turn(chat_tokenizer):
    example = Example.conversation("m", msgs(TWO_TURNS))
    item = tokenize_example(chat_tokenizer, example, TokenizationConfig(max_length=512))
    assert list(item.input_ids) == chat_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    text = chat_tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text_of(chat_tokenizer, item.input_ids) == text
    assert loss_text(chat_tokenizer, item) == "Yes<|im_end|>\n"  # no EOS appended: the template ends the turn
    # The byte tokenizer maps characters to tokens one to one: the loss starts where the prompt rendered with
    # the generation prompt ends.
    prompt_text = chat_tokenizer.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=True)
    assert item.prompt_length == len(prompt_text) and item.loss_mask is None and not item.truncated


def test_loss_scopes_on_a_multi_turn_conversation(chat_tokenizer):
    example = Example.conversation("m", msgs(TWO_TURNS))
    items = {scope: tokenize_example(chat_tokenizer, example, TokenizationConfig(512, loss_scope=scope))
             for scope in ("response", "assistant", "all")}
    assert items["response"].input_ids == items["assistant"].input_ids == items["all"].input_ids
    assert loss_text(chat_tokenizer, items["assistant"]) == "Hello!<|im_end|>\nYes<|im_end|>\n"
    mask = items["assistant"].loss_mask
    assert mask is not None and not all(mask[items["assistant"].prompt_length :])  # a gap: the second user turn
    assert items["all"].loss_positions() == list(range(1, len(items["all"].input_ids)))
    batch = collate([items["assistant"], items["response"]], chat_tokenizer.pad_token_id)
    ids = batch["input_ids"][0]
    on = torch.tensor(mask)
    assert torch.equal(batch["labels"][0][on], ids[on]) and (batch["labels"][0][~on] == IGNORE_INDEX).all()
    assert int(batch["answer_positions"][0]) == items["assistant"].prompt_length - 1
    assert int(batch["logits_start"]) == items["assistant"].prompt_length - 1


def test_loss_scopes_on_a_prompt_response_example(chat_tokenizer):
    example = Example("p", "Is it red?", " Yes")
    response = tokenize_example(chat_tokenizer, example, TokenizationConfig(64))
    assistant = tokenize_example(chat_tokenizer, example, TokenizationConfig(64, loss_scope="assistant"))
    everything = tokenize_example(chat_tokenizer, example, TokenizationConfig(64, loss_scope="all"))
    assert response == assistant  # the response is the assistant's turn
    assert everything.input_ids == response.input_ids and everything.prompt_length == 1
    labels = collate([everything], chat_tokenizer.pad_token_id)["labels"][0]
    assert labels[0] == IGNORE_INDEX and labels[1:].tolist() == list(everything.input_ids[1:])
    with pytest.raises(InputError, match="unknown loss scope 'tokens'"):
        TokenizationConfig(64, loss_scope="tokens")


def test_prompt_completion_conversation_starts_the_completion_after_the_generation_prompt(chat_tokenizer):
    example = Example.conversation("pc", msgs(TWO_TURNS), prompt_turns=3)
    item = tokenize_example(chat_tokenizer, example, TokenizationConfig(512))
    prompt_ids = chat_tokenizer.apply_chat_template(TWO_TURNS[:3], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(item.input_ids[: len(prompt_ids)]) == prompt_ids and item.prompt_length == len(prompt_ids)
    assert loss_text(chat_tokenizer, item) == "Yes<|im_end|>\n"


def test_long_conversation_prompt_is_cut_from_the_left(chat_tokenizer):
    example = Example.conversation("m", msgs(TWO_TURNS))
    full = tokenize_example(chat_tokenizer, example, TokenizationConfig(512))
    cut = tokenize_example(chat_tokenizer, example, TokenizationConfig(40))
    assert cut.truncated and len(cut.input_ids) == 40 and cut.input_ids == full.input_ids[-40:]
    assert loss_text(chat_tokenizer, cut) == "Yes<|im_end|>\n"
    with pytest.raises(FitError, match="example 'm': its tokens from the first loss token on are 14"):
        tokenize_example(chat_tokenizer, example, TokenizationConfig(14))
    # With every assistant turn in the loss, the first turn must fit as well.
    with pytest.raises(FitError, match="loss scope 'assistant'"):
        tokenize_example(chat_tokenizer, example, TokenizationConfig(40, loss_scope="assistant"))


def test_template_that_is_not_prefix_consistent_is_refused_naming_the_row(tmp_path):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = NOT_PREFIX_CONSISTENT
    example = Example.conversation("odd", msgs(TWO_TURNS))
    with pytest.raises(InputError, match="example 'odd': the chat template is not prefix-consistent at turn 3"):
        tokenize_example(tokenizer, example, TokenizationConfig(512))
    # Scope 'all' needs no turn boundaries.
    assert tokenize_example(tokenizer, example, TokenizationConfig(512, loss_scope="all")).input_ids
    path = write_lines(tmp_path / "chat.jsonl", [{"id": "plain", "prompt": "P", "response": "R"},
                                                 {"id": "odd", "messages": TWO_TURNS}])
    with pytest.raises(InputError) as info:
        check_examples_fit(tokenizer, read_examples(path), 512, path)
    assert str(info.value).startswith(f"{path}:2: example 'odd': the chat template is not prefix-consistent")


def test_conversations_without_a_chat_template_are_an_error_naming_the_file(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [{"id": "m", "messages": TWO_TURNS}])
    with pytest.raises(InputError) as info:
        check_examples_fit(build_byte_tokenizer(), read_examples(path), 256, path)
    assert str(info.value).startswith(f"{path}:1: example 'm' is a conversation but the tokenizer has no chat template")


# --- TRL's own preprocessing ---------------------------------------------------------------------------


def trl_tokenized(rows, template, tmp_path, tokenizer=None, **config):
    """Rows as TRL 1.16's SFTTrainer prepares them (its dataset map: chat template, masks, labels); the
    model (tiny) only has to exist, the tokenizer (default: the byte tokenizer) does the work."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from llmeraser.models import build_tiny_model

    model, byte_tokenizer = build_tiny_model(hidden_size=8, num_layers=1)
    tokenizer = tokenizer or byte_tokenizer
    tokenizer.chat_template = template
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True,
                         disable_tqdm=True, **config)
    logging.getLogger("trl").setLevel(logging.ERROR)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    return [trainer.train_dataset[i] for i in range(len(rows))], tokenizer


CONVERSATIONS = [
    TWO_TURNS,
    [{"role": "system", "content": "Answer Yes or No."}, {"role": "user", "content": "Red cat?"},
     {"role": "assistant", "content": "No"}],
    [{"role": "user", "content": "ünïcode ✓"}, {"role": "assistant", "content": "fine\nand two lines"}],
]


def ours(tokenizer, examples, scope):
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(1024, loss_scope=scope))
    labels = collate(items, tokenizer.pad_token_id)["labels"]
    return [(list(item.input_ids), labels[row, : len(item.input_ids)].tolist()) for row, item in enumerate(items)]


def test_prompt_completion_matches_trl_sft_trainer(tmp_path):
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    theirs, tokenizer = trl_tokenized(rows, CHATML, tmp_path)  # completion_only_loss: TRL's default here
    examples = [Example.conversation(str(i), msgs(c), len(c) - 1) for i, c in enumerate(CONVERSATIONS)]
    for (ids, labels), row in zip(ours(tokenizer, examples, "response"), theirs):
        assert ids == row["input_ids"]
        assert labels == row["labels"]


def test_messages_match_trl_sft_trainer_full_and_assistant_only(tmp_path):
    rows = [{"messages": c} for c in CONVERSATIONS]
    examples = [Example.conversation(str(i), msgs(c)) for i, c in enumerate(CONVERSATIONS)]
    theirs, tokenizer = trl_tokenized(rows, CHATML, tmp_path)  # TRL's default for messages: every token
    for (ids, labels), row in zip(ours(tokenizer, examples, "all"), theirs):
        assert ids == row["input_ids"]
        assert labels[1:] == row["labels"][1:]  # the first token is never predicted: its label is unused
    theirs, tokenizer = trl_tokenized(rows, CHATML_GENERATION, tmp_path, assistant_only_loss=True)
    for (ids, labels), row in zip(ours(tokenizer, examples, "assistant"), theirs):
        assert ids == row["input_ids"]
        assert labels == row["labels"]


# --- the loss ------------------------------------------------------------------------------------------


def test_conversation_loss_is_the_mean_over_its_assistant_tokens(chat_tokenizer):
    model, _ = tiny_lora_model(r=2, seed=1)
    examples = [Example.conversation("m", msgs(TWO_TURNS)), Example("p", "Is it?", " Yes")]
    items = tokenize_examples(chat_tokenizer, examples, TokenizationConfig(512, loss_scope="assistant"))
    batch = collate(items, chat_tokenizer.pad_token_id)
    with exact_float64_llama(), one_thread(), torch.no_grad():
        losses = example_losses(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row, item in enumerate(items):
        log_probs = torch.log_softmax(logits[row], dim=-1)
        manual = torch.stack([-log_probs[t - 1, item.input_ids[t]] for t in item.loss_positions()]).mean()
        assert torch.allclose(losses[row], manual, rtol=1e-12, atol=0)


# --- edits and hashing ---------------------------------------------------------------------------------


def test_edits_address_the_last_turns_or_a_given_turn(tmp_path):
    example = Example.conversation("m", msgs(TWO_TURNS))
    assert CorrectResponse("m", "No").apply(example).messages[3] == Message("assistant", "No")
    assert ModifyQuery("m", "Is it blue?").apply(example).messages[2] == Message("user", "Is it blue?")
    assert CorrectResponse("m", "Hey", turn=1).apply(example).messages[1] == Message("assistant", "Hey")
    assert ModifyQuery("m", "Hello", turn=0).apply(example).messages[:2] == msgs([{"role": "user", "content": "Hello"},
                                                                                 TWO_TURNS[1]])
    corrected = CorrectResponse("m", "No").apply(Example.conversation("m", msgs(TWO_TURNS), 3))
    assert corrected.prompt_turns == 3 and corrected.response == "No"

    requests = tmp_path / "req.jsonl"
    write_lines(requests, [{"op": "correct_response", "id": "m", "response": "x", "turn": 2},
                           {"op": "modify_query", "id": "p", "prompt": "y", "turn": 9}])
    parsed = read_requests(requests)
    assert parsed[0].turn == 2 and parsed[0].to_json()["turn"] == 2
    with pytest.raises(InputError) as info:
        resolve(parsed[:1], [example])
    assert str(info.value) == f"{requests}:1: example 'm': turn 2 is a 'user' message, expected an assistant turn"
    with pytest.raises(InputError, match=r"req\.jsonl:2: example 'p' is not a conversation: 'turn' does not apply"):
        resolve(parsed[1:], [Example("p", "P", "R"), example])
    with pytest.raises(InputError, match=r"turn 7 is out of range \(the conversation has 4 messages"):
        CorrectResponse("m", "x", turn=7).apply(example)
    write_lines(requests, [{"op": "correct_response", "id": "m", "response": "x", "turn": "last"}])
    with pytest.raises(InputError, match=r"req\.jsonl:1: field 'turn' must be a non-negative integer"):
        read_requests(requests)


def test_hash_covers_the_conversation_deterministically():
    base = Example.conversation("m", msgs(TWO_TURNS))
    assert example_hash(base) == example_hash(Example.conversation("m", msgs(TWO_TURNS)))
    variants = [
        CorrectResponse("m", "No").apply(base),
        CorrectResponse("m", "Hey", turn=1).apply(base),
        Example.conversation("m", (Message("system", "Hi there"),) + msgs(TWO_TURNS)[1:]),
        Example.conversation("m", msgs(TWO_TURNS), prompt_turns=3),  # same turns, the loss on the completion
        Example("m", "Is it red?", "Yes"),  # the same views, no conversation
    ]
    hashes = {example_hash(base)} | {example_hash(v) for v in variants}
    assert len(hashes) == len(variants) + 1
    assert dataset_hash([base, variants[0]]) != dataset_hash([variants[0], base])


# --- properties ----------------------------------------------------------------------------------------

contents = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def conversations(draw):
    """Alternating user/assistant turns (optionally after a system turn), ending on an assistant turn."""
    turns = draw(st.integers(1, 3))
    messages = [Message("system", draw(contents))] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [Message("user", draw(contents)), Message("assistant", draw(contents))]
    return tuple(messages)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations(), st.booleans())
def test_assistant_scope_is_every_assistant_turn_and_the_hash_round_trips(chat_tokenizer, messages, layout):
    example = Example.conversation("c", messages, len(messages) - 1 if layout else None)
    item = tokenize_example(chat_tokenizer, example, TokenizationConfig(2048, loss_scope="assistant"))
    expected = "".join(f"{m.content}<|im_end|>\n" for m in messages if m.role == "assistant")
    assert loss_text(chat_tokenizer, item) == expected
    response = tokenize_example(chat_tokenizer, example, TokenizationConfig(2048))
    assert loss_text(chat_tokenizer, response) == f"{messages[-1].content}<|im_end|>\n"
    (again,) = examples_from_rows(json.loads(json.dumps([example.to_json()])))
    assert again == example and example_hash(again) == example_hash(example)


def test_null_keys_of_a_table_s_message_structs_are_ignored(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": "a", "messages": [{"role": "user", "content": "Hi", "name": "ann"},
                                     {"role": "assistant", "content": "Yo", "name": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d\.parquet: row 0: field 'messages' message 0: unsupported key\(s\) 'name'"):
        read_examples(tmp_path / "d.parquet")
    rows[0]["messages"][0]["name"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_examples(tmp_path / "d.parquet")[0].messages == (Message("user", "Hi"), Message("assistant", "Yo"))


@pytest.mark.real_model
def test_smollm2_template_is_prefix_consistent_and_matches_trl(tmp_path):
    """SmolLM2-135M-Instruct's own tokenizer and template (the cached conversion; ~30 s on first use)."""
    from transformers import AutoTokenizer

    from llmeraser.models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    examples = [Example.conversation(str(i), msgs(c)) for i, c in enumerate(CONVERSATIONS)]
    for example, item in zip(examples, tokenize_examples(tokenizer, examples, TokenizationConfig(1024, loss_scope="assistant"))):
        turns = [f"{m.content}<|im_end|>\n" for m in example.messages if m.role == "assistant"]
        assert tokenizer.decode([item.input_ids[i] for i in item.loss_positions()]) == "".join(turns)
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    theirs, _ = trl_tokenized(rows, tokenizer.chat_template, tmp_path, tokenizer=tokenizer)
    pairs = [Example.conversation(str(i), msgs(c), len(c) - 1) for i, c in enumerate(CONVERSATIONS)]
    for (ids, labels), row in zip(ours(tokenizer, pairs, "response"), theirs):
        assert ids == row["input_ids"] and labels == row["labels"]
