"""``LlmeraserCallback``: a few steps of ``transformers.Trainer`` on the tiny model write llmeraser's
training record (and fit the curvature cache), and the adapter is then erased by the CLI with no extra flags."""

from __future__ import annotations

import json

import pytest
from cli_helpers import cli
from conftest import one_thread, pad_rows, toy_examples

from llmeraser.data import IGNORE_INDEX, TokenizationConfig, tokenize_examples, write_examples
from llmeraser.integrations import LlmeraserCallback, effective_l2


def trainer_rows(tokenizer, examples, max_length):
    """The examples as a Trainer reads them: input ids, and labels with the prompt masked (llmeraser's
    ``response`` scope)."""
    rows = []
    for item in tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length)):
        labels = [IGNORE_INDEX] * item.prompt_length + list(item.input_ids[item.prompt_length:])
        rows.append({"input_ids": list(item.input_ids), "labels": labels})
    return rows


def test_trainer_run_with_the_callback_is_erased_with_no_extra_flags(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from llmeraser.models import load_base_model

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    examples = toy_examples(12, seed=6)
    data, requests = tmp_path / "train.jsonl", tmp_path / "requests.jsonl"
    write_examples(data, examples)
    requests.write_text('{"op": "remove", "id": "ex2"}\n{"op": "correct_response", "id": "ex3", "response": " Maybe"}\n')
    base, tokenizer = load_base_model("tiny")  # seed 0, the TrainingArguments' seed below
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, seed=0, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    callback = LlmeraserCallback(data, loss_scope="response", max_length=128, fit_curvature=True)
    trainer = Trainer(model=model, args=args, train_dataset=trainer_rows(tokenizer, examples, 128),
                      data_collator=lambda rows: pad_rows(rows, tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=[callback])
    with one_thread():
        trainer.train()
        trainer.save_model()

    record = json.loads((out / "llmeraser_training.json").read_text())
    assert record["origin"] == "llmeraser.integrations.LlmeraserCallback" and record["model"] == "tiny"
    assert record["n_examples"] == 12 and record["recipe"]["loss_scope"] == "response"
    assert record["recipe"]["max_length"] == 128 and record["trainer_weight_decay"] == 0.1
    decay = record["recipe"]["weight_decay"]  # AdamW's decoupled 0.1 mapped to an L2 coefficient
    assert 0 < decay < 0.1
    params = [p for p in model.parameters() if p.requires_grad]
    assert effective_l2(trainer.optimizer, params, 0.1) == pytest.approx(decay)

    done = cli("erase", "--adapter", out, "--data", data, "--requests", requests, "--out", tmp_path / "erased")
    assert done.code == 0, done.err
    assert "fitting the" not in done.out  # the callback fitted the cache the default erase looks for
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())
    assert report["config"]["weight_decay"] == pytest.approx(decay) and report["config"]["max_length"] == 128
    assert report["training_record"] == "recorded" and report["requests"]["remove"] == 1
    assert cli("erase", "--adapter", out, "--data", data, "--requests", requests, "--out", tmp_path / "x",
               "--mode", "retrain").code == 3  # the Trainer's recipe is not llmeraser's: no paired retrain


def test_plain_trainer_needs_the_loss_scope(tmp_path):
    callback = LlmeraserCallback(toy_examples(3))
    with pytest.raises(ValueError, match="loss_scope"):
        callback.on_train_begin(type("Args", (), {"max_length": 8})(), None, None)


def test_sft_trainer_run_with_the_callback_is_erased_with_no_extra_flags(tmp_path, monkeypatch):
    """TRL's SFTTrainer on prompt/completion rows without ids: the callback reads loss scope and max length
    from the SFTConfig and hashes the rows as llmeraser reads them (ids from row numbers)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from llmeraser.models import load_base_model

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": e.prompt, "completion": e.response} for e in toy_examples(10, seed=8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "requests.jsonl").write_text('{"op": "remove", "id": "row-3"}\n')
    base, tokenizer = load_base_model("tiny")
    out = tmp_path / "sft"
    args = SFTConfig(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=4, learning_rate=1e-2,
                     weight_decay=0.05, seed=0, max_length=128, report_to=[], save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                         callbacks=[LlmeraserCallback(rows)])
    with one_thread():
        trainer.train()
        trainer.save_model()
    record = json.loads((out / "llmeraser_training.json").read_text())
    assert record["recipe"]["loss_scope"] == "response" and record["recipe"]["max_length"] == 128
    done = cli("erase", "--adapter", out, "--data", data, "--requests", tmp_path / "requests.jsonl",
               "--out", tmp_path / "erased")
    assert done.code == 0, done.err
    assert json.loads((tmp_path / "erased" / "erasure_report.json").read_text())["requests"]["remove"] == 1
