"""The trainer × data-format matrix on the tiny model: an adapter trained by ``llmeraser train``, by peft +
``transformers.Trainer`` + ``LlmeraserCallback``, or by TRL's ``SFTTrainer`` + the callback, on plain
prompt/response rows (TRL: prompt/completion) or on chat ``messages``, is erased with one request file
mixing a ``remove`` and a ``correct_response`` (on a conversation: ``"turn": 1``, its first assistant turn)
through the command line and through ``llmeraser.Adapter``, and both results load with
``PeftModel.from_pretrained``. Before that, the loss llmeraser computes for each training example is
checked against the loss the trainer optimised: same token ids, same loss mask, same summed NLL.

Loss scopes covered: ``llmeraser train`` on chat data uses its default ``response`` (the last assistant
turn); the HF ``Trainer`` run masks with ``apply_chat_template(..., return_assistant_tokens_mask=True)``
(``assistant``: every assistant turn); TRL on ``messages`` trains on every token, its default (``all``),
which the callback reads from the ``SFTConfig``. The chat base model is the tiny model saved to a
directory with a short ChatML-like template (one byte a token, ``{% generation %}`` markers on the
assistant turns), loaded by path as a user's own base model would be.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from conftest import exact_float64_llama, one_thread, pad_rows, toy_examples

import llmeraser
from llmeraser.data import IGNORE_INDEX, TokenizationConfig, collate, example_losses, read_examples, tokenize_examples
from llmeraser.integrations import LlmeraserCallback
from llmeraser.models import build_tiny_model, load_base_model

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}\n"
    "{% endgeneration %}{% else %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
CHATS = [
    [("user", "Sky?"), ("assistant", "Blue")],
    [("user", "Grass?"), ("assistant", "Green")],
    [("user", "Sun?"), ("assistant", "Hot"), ("user", "Moon?"), ("assistant", "Cold")],
    [("system", "Be short."), ("user", "Snow?"), ("assistant", "White")],
    [("user", "Fish?"), ("assistant", "Swim"), ("user", "Birds?"), ("assistant", "Fly")],
    [("user", "Rock?"), ("assistant", "Hard")],
]
MAX_LENGTH = 128
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
CLI_TRAIN = ["--lora-r", "2", "--lora-alpha", "4", "--target-modules", "q_proj", "v_proj", "--epochs", "1",
             "--batch-size", "2", "--lr", "1e-2", "--weight-decay", "0.1", "--max-length", str(MAX_LENGTH)]
ERASE_SETTINGS = {"solver": "cg", "max_iters": 8, "damping": 0.01}
ERASE_FLAGS = ["--mode", "update", "--solver", "cg", "--max-iters", "8", "--damping", "0.01"]
TOLERANCE = 1e-5


def messages(chat):
    return [{"role": role, "content": content} for role, content in chat]


def training_rows(kind: str, with_ids: bool) -> list[dict]:
    """Six rows: plain prompt/response (``completion`` without ids, as TRL names it) or ``messages``."""
    if kind == "plain":
        examples = toy_examples(6, seed=3)
        if with_ids:
            return [e.to_json() for e in examples]
        return [{"prompt": e.prompt, "completion": e.response} for e in examples]
    rows = [{"messages": messages(chat)} for chat in CHATS]
    return [{"id": f"c{i}", **row} for i, row in enumerate(rows)] if with_ids else rows


def request_lines(kind: str, with_ids: bool) -> str:
    """Remove the second row, correct the third: its response, or a conversation's first assistant turn."""
    ids = ("ex1", "ex2") if kind == "plain" and with_ids else ("c1", "c2") if with_ids else ("row-1", "row-2")
    correction = {"op": "correct_response", "id": ids[1], "response": " Maybe"}
    if kind == "chat":
        correction.update(turn=1, response="Warm")  # "turn": 0-based index into messages, an assistant turn
    return json.dumps({"op": "remove", "id": ids[0]}) + "\n" + json.dumps(correction) + "\n"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> str:
    """The tiny model (seed 0) saved with the chat template: a base model directory, as a user's."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    model, tokenizer = build_tiny_model(seed=0)
    tokenizer.chat_template = TEMPLATE
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def hf_rows(tokenizer, rows: list[dict], kind: str) -> list[dict]:
    """The rows tokenised for the HF Trainer, independently of llmeraser: prompt tokens, response tokens and
    EOS, the prompt masked; a conversation by the chat template, masked outside its assistant turns
    (``return_assistant_tokens_mask``, from the template's ``{% generation %}`` markers)."""
    out = []
    for row in rows:
        if kind == "plain":
            prompt = tokenizer(row["prompt"])["input_ids"]
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
        else:
            done = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
            ids = list(done["input_ids"])
            labels = [t if on else IGNORE_INDEX for t, on in zip(ids, done["assistant_masks"])]
            out.append({"input_ids": ids, "labels": labels})
    return out


@dataclass
class Trained:
    """An adapter directory with the data file it was trained on, and the trainer's view of each row:
    ``rows`` (``input_ids`` / ``labels`` as its collator receives them), ``collator`` (rows → batch) and
    ``loss`` ((model, batch) → the batch loss the trainer optimises: mean NLL over its label tokens)."""

    adapter: Path
    data: Path
    scope: str
    rows: list[dict]
    collator: Callable
    loss: Callable
    model: object = None  # the model object the trainer trained (None: load the adapter)
    own_loss_rel: float = 1e-6  # how close the trainer's own ``compute_loss`` is to the exact NLL of its batch


def training_args(cls, out: Path, **extra):
    return cls(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=2, learning_rate=1e-2,
               weight_decay=0.1, seed=0, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
               use_cpu=True, dataloader_num_workers=0, **extra)


def hf_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_cli(tmp_path: Path, kind: str, base: str) -> Trained:
    """``llmeraser train``: its tokens and mask are llmeraser's own; the loss is checked against the causal
    LM's own loss (``model(labels=...)``, as a Trainer computes it) on those labels."""
    data = write_rows(tmp_path / "train.jsonl", training_rows(kind, with_ids=True))
    done = cli("train", "--model", base, "--data", data, "--out", tmp_path / "adapter", *CLI_TRAIN)
    assert done.code == 0, done.err
    _, tokenizer = load_base_model(base)
    items = tokenize_examples(tokenizer, read_examples(data), TokenizationConfig(MAX_LENGTH, loss_scope="response"))
    labels = collate(items, tokenizer.pad_token_id)["labels"]
    rows = [{"input_ids": list(item.input_ids), "labels": labels[k, : len(item.input_ids)].tolist()}
            for k, item in enumerate(items)]
    return Trained(tmp_path / "adapter", data, "response", rows, lambda r: pad_rows(r, tokenizer.pad_token_id), hf_loss)


def train_hf(tmp_path: Path, kind: str, base_name: str) -> Trained:
    """peft + ``transformers.Trainer`` with our own collator, and the callback (loss scope given)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    rows = training_rows(kind, with_ids=True)
    data = write_rows(tmp_path / "train.jsonl", rows)
    scope = "response" if kind == "plain" else "assistant"
    base, tokenizer = load_base_model(base_name)
    model = get_peft_model(base, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    tokenised = hf_rows(tokenizer, rows, kind)
    trainer = Trainer(model=model, args=training_args(TrainingArguments, tmp_path / "adapter"), train_dataset=tokenised,
                      data_collator=lambda r: pad_rows(r, tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=[LlmeraserCallback(data, loss_scope=scope, max_length=MAX_LENGTH)])
    with one_thread():
        trainer.train()
        trainer.save_model()
    return Trained(tmp_path / "adapter", data, scope, tokenised, trainer.data_collator,
                   lambda m, b: trainer.compute_loss(m, b), trainer.model)


def train_trl(tmp_path: Path, kind: str, base_name: str) -> Trained:
    """TRL's ``SFTTrainer`` on rows without ids (ids are row numbers): its own tokenised dataset, collator and
    ``compute_loss``; the callback reads loss scope and max length from the ``SFTConfig``."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = training_rows(kind, with_ids=False)
    data = write_rows(tmp_path / "train.jsonl", rows)
    base, tokenizer = load_base_model(base_name)
    logging.getLogger("trl").setLevel(logging.ERROR)
    trainer = SFTTrainer(model=base, args=training_args(SFTConfig, tmp_path / "adapter", max_length=MAX_LENGTH),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA), callbacks=[LlmeraserCallback(rows)])
    with one_thread():
        trainer.train()
        trainer.save_model()
    tokenised = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    assert len(tokenised) == len(rows)  # TRL dropped no row
    return Trained(tmp_path / "adapter", data, "response" if kind == "plain" else "all", tokenised,
                   trainer.data_collator, lambda m, b: trainer.compute_loss(m, b), trainer.model,
                   own_loss_rel=TRL_FUSED_LOSS_REL)


# TRL 1.16's SFTTrainer computes its loss with a chunked "fused LM head" (trl.kernels.chunked_logprob, the
# torch path on CPU): on the tiny model it differs from the exact NLL of the same tokens and labels by about
# 1e-4 relative (measured: ~5e-4 nats on a token of ~5.5), far above float32 rounding; llmeraser is compared
# with the exact NLL of TRL's tokens and mask, and TRL's own number with that to this tolerance.
TRL_FUSED_LOSS_REL = 5e-4


TRAINERS = {"llmeraser-train": train_cli, "hf-trainer": train_hf, "trl-sft": train_trl}


def summed_nll(model, batch) -> float:
    """The summed NLL of a batch's labels by the rule of a Hugging Face causal LM's loss (``labels`` shifted
    by one, ``-100`` ignored), in the model's precision (its own loss upcasts logits to float32 only)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:].reshape(-1)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="sum"))


def check_losses_match(trained: Trained, base_name: str) -> None:
    """Same token ids and loss mask as the trainer's rows, and the same summed NLL within 1e-5.

    The trainer's loss of a batch is the mean NLL over all label tokens of the batch (its ``compute_loss``,
    here with no ``num_items_in_batch``); llmeraser's is each example's mean over its loss tokens. So they
    are compared where they must agree, as summed NLL: for each example alone (a batch of one, as the
    trainer's collator builds it), and over the whole set in one padded batch (Σ_i llmeraser's loss_i × T_i,
    T_i its loss tokens). In float64 (the trained model cast; RMSNorm and attention kept in float64), so
    that 1e-5 is far below one token's NLL: the trainer's summed NLL is taken from its batch by its model's
    loss rule (``summed_nll``), and checked against the trainer's own ``compute_loss`` × its label count
    (transformers computes it in float32: to 1e-6 relative; TRL's fused LM head: see ``TRL_FUSED_LOSS_REL``).
    The labels are compared from position 1 on:
    the first token is never predicted, whatever its label.
    """
    from peft import PeftModel

    if trained.model is not None:
        model = trained.model
    else:
        base, _ = load_base_model(base_name)
        model = PeftModel.from_pretrained(base, trained.adapter)
    model = model.to(torch.float64).eval()
    _, tokenizer = load_base_model(base_name)
    examples = read_examples(trained.data)
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(MAX_LENGTH, loss_scope=trained.scope))
    ours = collate(items, tokenizer.pad_token_id)
    for k, (item, row) in enumerate(zip(items, trained.rows)):
        assert list(item.input_ids) == list(row["input_ids"]), examples[k].id
        assert ours["labels"][k, 1 : len(item.input_ids)].tolist() == list(row["labels"])[1:], examples[k].id
    counts = [len(item.loss_positions()) for item in items]
    with exact_float64_llama(), one_thread(), torch.no_grad():
        per_example = example_losses(model, ours)
        for k, (item, row) in enumerate(zip(items, trained.rows)):
            batch = trained.collator([row])
            assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == counts[k], examples[k].id
            theirs = summed_nll(model, batch)
            assert float(trained.loss(model, batch)) * counts[k] == pytest.approx(theirs, rel=trained.own_loss_rel)
            alone = float(example_losses(model, collate([item], tokenizer.pad_token_id))[0]) * counts[k]
            assert alone == pytest.approx(theirs, abs=TOLERANCE), examples[k].id
            assert float(per_example[k]) * counts[k] == pytest.approx(theirs, abs=TOLERANCE), examples[k].id
        batch = trained.collator(trained.rows)
        total = summed_nll(model, batch)
        assert float(trained.loss(model, batch)) * sum(counts) == pytest.approx(total, rel=trained.own_loss_rel)
        ours_total = sum(float(loss) * count for loss, count in zip(per_example, counts))
        assert ours_total == pytest.approx(total, abs=TOLERANCE)


def load_with_peft(base_name: str, adapter: Path):
    """``PeftModel.from_pretrained`` on the adapter directory; its LoRA tensors as loaded."""
    from peft import PeftModel

    base, _ = load_base_model(base_name)
    model = PeftModel.from_pretrained(base, adapter)
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("kind", ["plain", "chat"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_trained_adapter_is_erased_by_cli_and_api_and_loads_with_peft(trainer, kind, tmp_path, monkeypatch, chat_base):
    from safetensors.torch import load_file

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    base_name = "tiny" if kind == "plain" else chat_base
    trained = TRAINERS[trainer](tmp_path, kind, base_name)
    record = json.loads((trained.adapter / "llmeraser_training.json").read_text())
    assert record["recipe"]["loss_scope"] == trained.scope and record["n_examples"] == 6
    check_losses_match(trained, base_name)

    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_lines(kind, with_ids=trainer != "trl-sft"))
    done = cli("erase", "--adapter", trained.adapter, "--data", trained.data, "--requests", requests,
               "--out", tmp_path / "cli-erased", *ERASE_FLAGS)
    assert done.code == 0, done.err

    adapter = llmeraser.Adapter.load(trained.adapter)
    train, reqs = llmeraser.read_examples(trained.data), llmeraser.read_requests(requests)
    with one_thread():
        erased = adapter.erase(train, reqs, adapter.erase_config(**ERASE_SETTINGS), progress=False)
    erased.save(tmp_path / "api-erased")

    original = load_with_peft(base_name, trained.adapter)
    stored = {}
    for name in ("cli-erased", "api-erased"):
        out = tmp_path / name
        report = json.loads((out / "erasure_report.json").read_text())
        assert report["requests"] == {"remove": 1, "modify_query": 0, "correct_response": 1}
        assert report["config"]["loss_scope"] == trained.scope
        stored[name] = load_file(out / "adapter_model.safetensors")
        loaded = load_with_peft(base_name, out)
        assert loaded.keys() == original.keys()
        assert any((loaded[k] - original[k]).abs().max() > 0 for k in loaded)  # the erasure moved θ
        assert all(torch.isfinite(t).all() for t in loaded.values())
    a, b = stored["cli-erased"], stored["api-erased"]
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    assert json.loads((tmp_path / "api-erased" / "llmeraser_training.json").read_text())["n_examples"] == 5
