"""The tiny base model, θ as a flat vector, and adapter directories that PEFT can load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_lora_model

from llmeraser.adapter import AdapterParameters, adapter_disabled, load_adapter, save_adapter
from llmeraser.errors import InputError
from llmeraser.models import build_tiny_model, load_base_model


def state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_tiny_is_deterministic_by_seed_and_leaves_the_global_rng_alone():
    rng = torch.random.get_rng_state()
    first, _ = build_tiny_model(seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    second, _ = build_tiny_model(seed=0)
    other, _ = build_tiny_model(seed=1)
    a, b, c = state(first), state(second), state(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_load_base_model_tiny_is_frozen_eval_and_typed():
    model, tokenizer = load_base_model("tiny", seed=0, dtype=torch.float64)
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in model.parameters())
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert model.config._attn_implementation == "eager"


@pytest.fixture
def lora():
    model, tokenizer = tiny_lora_model(r=2, seed=0)
    params = AdapterParameters.of(model)
    generator = torch.Generator().manual_seed(0)
    params.assign(torch.randn(params.dim, generator=generator, dtype=torch.float64))
    return model, tokenizer, params


def test_adapter_parameters_flat_split_assign_round_trip(lora):
    model, _, params = lora
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params.names == [n for n, _ in trainable]
    assert all("lora_" in n for n in params.names)
    # layers × (q: A, B; v: A, B)
    assert params.dim == sum(p.numel() for _, p in trainable) == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)
    flat = params.flat()
    assert flat.shape == (params.dim,)
    pieces = params.split(flat)
    assert all(torch.equal(piece, p.detach()) for piece, (_, p) in zip(pieces, trainable))
    assert torch.equal(params.flatten(pieces), flat)
    assert list(params.as_dict(flat)) == params.names
    # flat() is a copy; assign() writes in place and round-trips exactly.
    flat += 1.0
    assert not torch.equal(params.flat(), flat)
    params.assign(flat)
    assert torch.equal(params.flat(), flat)
    assert all(p is q for p, (_, q) in zip(params.tensors, trainable))


def test_adapter_parameters_reject_wrong_shapes_and_frozen_models(lora):
    _, _, params = lora
    with pytest.raises(ValueError, match=rf"expected a vector of shape \({params.dim},\), got \(3,\)"):
        params.split(torch.zeros(3, dtype=torch.float64))
    base, _ = load_base_model("tiny")
    with pytest.raises(InputError, match="no trainable"):
        AdapterParameters.of(base)



def test_adapter_disabled_computes_the_base_model_and_keeps_theta_trainable(lora):
    """Inside, the outputs are those with the LoRA B factors zeroed (ΔW = 0), whatever θ is; every
    requires_grad flag is as before, inside and after (one adapter tensor frozen by hand here)."""
    model, _, _ = lora
    params = AdapterParameters.of(model)
    theta = params.flat()
    frozen = next(p for name, p in model.named_parameters() if "lora_A" in name)
    frozen.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    tokens = torch.tensor([[1, 5, 7, 9]])
    try:
        params = AdapterParameters.of(model)
        moved = params.flat() + 0.5  # the B factors non-zero: the adapter changes the outputs
        params.assign(moved)
        with torch.no_grad():
            adapted = model(tokens).logits
            with adapter_disabled(model):
                assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
                base = model(tokens).logits
            for name, tensor in model.named_parameters():
                if "lora_B" in name:
                    tensor.zero_()
            zeroed = model(tokens).logits
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert not torch.allclose(adapted, base)
        torch.testing.assert_close(base, zeroed)
    finally:
        frozen.requires_grad_(True)
        AdapterParameters.of(model).assign(theta)


def test_save_adapter_writes_a_loadable_peft_directory(tmp_path, lora):
    from peft import PeftModel

    model, _, params = lora
    original = params.flat()
    theta = original + 0.5
    out = save_adapter(model, tmp_path / "adapter", theta=theta, extra_files={"report.json": {"k": 1}})
    assert out == tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "report.json").read_text()) == {"k": 1}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert torch.equal(params.flat(), original)  # the model's own θ is restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left

    base, _ = load_base_model("tiny", seed=0, dtype=torch.float64)
    loaded = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    loaded_params = AdapterParameters.of(loaded)
    assert loaded_params.names == params.names
    assert torch.equal(loaded_params.flat(), theta)

    # load_adapter gives the same θ, trainable, in eval mode; the function is the same.
    again = load_adapter(load_base_model("tiny", seed=0, dtype=torch.float64)[0], out)
    assert not again.training
    assert torch.equal(AdapterParameters.of(again).flat(), theta)
    ids = torch.tensor([[1, 70, 71, 72, 73]])
    params.assign(theta)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_adapter_default_theta_is_the_models(tmp_path, lora):
    model, _, params = lora
    out = save_adapter(model, tmp_path / "a")
    again = load_adapter(load_base_model("tiny", seed=0, dtype=torch.float64)[0], out)
    assert torch.equal(AdapterParameters.of(again).flat(), params.flat())


def test_save_adapter_refuses_an_existing_directory(tmp_path, lora):
    model, _, _ = lora
    existing = tmp_path / "adapter"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="output directory already exists"):
        save_adapter(model, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing_and_restores_theta(tmp_path, lora):
    model, _, params = lora
    original = params.flat()
    with pytest.raises(TypeError):
        save_adapter(model, tmp_path / "adapter", theta=original * 2, extra_files={"bad.json": {"x": object()}})
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(params.flat(), original)


def test_load_adapter_rejects_non_adapter_directories(tmp_path):
    base, _ = load_base_model("tiny")
    with pytest.raises(InputError, match="not a PEFT adapter directory"):
        load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="must be adapter_model.safetensors"):
        load_adapter(base, tmp_path)


def test_save_adapter_makes_no_hub_lookup(tmp_path, lora, monkeypatch):
    """Saving must work offline without asking the Hub about the base model's name."""
    import peft.utils.save_and_load as save_and_load

    def no_network(*args, **kwargs):
        raise AssertionError(f"hub lookup attempted: {args}")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_network)
    model, _, params = lora
    out = save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(load_base_model("tiny", dtype=torch.float64)[0], out)
    assert torch.equal(AdapterParameters.of(reloaded).flat(), params.flat())


GGUF_SETTING = {"dequantize": False, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quant_method": "gguf"}


def trainer_accepts(model, out) -> None:
    """``transformers.Trainer`` construction: where it refuses a model whose config says it is quantised."""
    from transformers import Trainer, TrainingArguments

    model.requires_grad_(True)
    Trainer(model=model, args=TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=1))


def test_converted_gguf_cache_has_no_quantization_config_and_trains_with_the_hf_trainer(tmp_path):
    """What ``smollm2_path`` writes after dequantising the GGUF file, on the tiny model (no download): the
    float32 weights without the GGUF ``quantization_config``, which ``transformers.Trainer`` refuses."""
    from transformers import AutoModelForCausalLM

    from llmeraser.models import save_converted

    model, tokenizer = build_tiny_model(seed=0)
    model.config.quantization_config = dict(GGUF_SETTING)  # as the GGUF loader leaves it
    save_converted(model, tokenizer, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert "quantization_config" not in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary left
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    trainer_accepts(loaded, tmp_path / "trainer")
    # the control: the same directory with the GGUF setting left in is refused
    config["quantization_config"] = GGUF_SETTING
    (tmp_path / "converted" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized"):
        trainer_accepts(AutoModelForCausalLM.from_pretrained(tmp_path / "converted"), tmp_path / "trainer")


def test_an_existing_cache_with_the_gguf_setting_is_fixed_on_load(tmp_path, monkeypatch):
    from llmeraser.models import drop_gguf_quantization_config, smollm2_path

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path))
    cache = tmp_path / "smollm2-135m-instruct"
    cache.mkdir()
    (cache / "model.safetensors").write_bytes(b"weights")  # not read: only the config is rewritten
    (cache / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": GGUF_SETTING}))
    assert smollm2_path() == cache
    assert json.loads((cache / "config.json").read_text()) == {"model_type": "llama"}
    assert drop_gguf_quantization_config(cache) is False  # already plain: left alone
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    (cache / "config.json").write_text(json.dumps(other))
    assert drop_gguf_quantization_config(cache) is False
    assert json.loads((cache / "config.json").read_text()) == other


def test_callers_at_once_convert_smollm2_once_and_all_get_the_copy(tmp_path, monkeypatch):
    """Two first uses at once (pytest-xdist workers, two commands): one converts, the other waits on the lock
    and then loads that copy instead of converting again."""
    import threading
    import time

    import llmeraser.models as models

    monkeypatch.setenv("LLMERASER_CACHE", str(tmp_path))
    conversions = []

    def convert(target):  # stands in for the ~30 s dequantisation
        conversions.append(target)
        time.sleep(0.5)
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"weights")
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    paths = []
    callers = [threading.Thread(target=lambda: paths.append(models.smollm2_path())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert paths == [tmp_path / "smollm2-135m-instruct"] * 2
    assert len(conversions) == 1


def test_a_copy_another_process_renamed_into_place_first_is_kept(tmp_path, monkeypatch):
    """Without the lock (another version, another host's cache): the other process's rename lands between
    the check and ours; its complete copy is kept and ours removed, no error."""
    import llmeraser.models as models

    target = tmp_path / "converted"
    real_fsync_tree = models.fsync_tree

    def other_process_finishes(directory):
        real_fsync_tree(directory)
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "fsync_tree", other_process_finishes)
    model, tokenizer = build_tiny_model(seed=0)
    models.save_converted(model, tokenizer, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary left
