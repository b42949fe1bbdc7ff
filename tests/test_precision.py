"""Mixed precision: a bfloat16 base model with a float32 adapter (θ, b, v and solver state float32)."""

from __future__ import annotations

import torch
from cli_helpers import FAST_TRAIN, cli
from conftest import one_thread, tiny_lora_model, toy_examples
from safetensors.torch import load_file

from llmeraser.adapter import AdapterParameters, load_adapter, save_adapter
from llmeraser.data import write_examples
from llmeraser.eraser import EraseConfig, erase
from llmeraser.hashing import model_fingerprint
from llmeraser.models import load_base_model
from llmeraser.requests import CorrectResponse, Remove
from llmeraser.train import TrainConfig, train_adapter

ERASE = EraseConfig(solver="cg", damping=0.05, weight_decay=0.1, batch_size=4, max_iters=40, max_length=128)
REQUESTS = [Remove("ex1"), Remove("ex4"), CorrectResponse("ex6", " Maybe")]


def saved_dtypes(directory) -> set[torch.dtype]:
    return {tensor.dtype for tensor in load_file(str(directory / "adapter_model.safetensors")).values()}


def test_bfloat16_base_keeps_a_float32_adapter(tmp_path):
    model, tokenizer = tiny_lora_model(r=2, dtype=torch.bfloat16)
    params = AdapterParameters.of(model)
    assert {t.dtype for t in params.tensors} == {torch.float32}
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    with one_thread():
        result = train_adapter(model, tokenizer, toy_examples(8), TrainConfig(epochs=2, lr=1e-2, batch_size=4))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert {t.dtype for t in params.tensors} == {torch.float32}
    save_adapter(model, tmp_path / "adapter")
    assert saved_dtypes(tmp_path / "adapter") == {torch.float32}
    base, _ = load_base_model("tiny", dtype=torch.bfloat16)
    loaded = AdapterParameters.of(load_adapter(base, tmp_path / "adapter"))
    assert {t.dtype for t in loaded.tensors} == {torch.float32}
    assert torch.equal(loaded.flat(), params.flat())


def test_bfloat16_erase_agrees_with_float32(tmp_path):
    examples = toy_examples(13, seed=7)
    model, tokenizer = tiny_lora_model(target_modules=("q_proj", "v_proj"), r=2, dtype=torch.float32)
    with one_thread():
        train_adapter(model, tokenizer, examples, TrainConfig(epochs=5, lr=2e-2, batch_size=4, weight_decay=0.1))
    save_adapter(model, tmp_path / "adapter")
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        base, tokenizer = load_base_model("tiny", dtype=dtype)
        erased = load_adapter(base, tmp_path / "adapter")
        with one_thread():
            result = erase(erased, tokenizer, examples, REQUESTS, ERASE)
        assert result.update.dtype == result.theta.dtype == result.rhs.dtype == torch.float32
        updates[dtype] = result.update
    cosine = torch.nn.functional.cosine_similarity(updates[torch.float32], updates[torch.bfloat16], dim=0)
    ratio = updates[torch.bfloat16].norm() / updates[torch.float32].norm()
    assert float(cosine) > 0.99, float(cosine)  # measured 0.99994 (norm ratio 0.997)
    assert 0.9 < float(ratio) < 1.1, float(ratio)


def test_dtype_flag_on_the_command_line(tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, toy_examples(10, seed=3))
    trained = cli("train", "--model", "tiny", "--data", data, "--out", tmp_path / "fp32", *FAST_TRAIN)
    assert trained.code == 0, trained.err
    trained = cli("train", "--model", "tiny", "--data", data, "--out", tmp_path / "bf16", *FAST_TRAIN, "--dtype", "bfloat16")
    assert trained.code == 0, trained.err
    assert saved_dtypes(tmp_path / "bf16") == {torch.float32}
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"op": "remove", "id": "ex2"}\n')
    # an adapter trained on the float32 model is erased with the bfloat16 one: the same base model (fingerprint)
    erased = cli("erase", "--adapter", tmp_path / "fp32", "--data", data, "--requests", requests,
                 "--out", tmp_path / "erased", "--dtype", "bfloat16", "--max-iters", "5")
    assert erased.code == 0, erased.err
    assert saved_dtypes(tmp_path / "erased") == {torch.float32}
    evaluated = cli("evaluate", "--adapter", tmp_path / "erased", "--data", data, "--dtype", "bfloat16")
    assert evaluated.code == 0, evaluated.err
    assert model_fingerprint(load_base_model("tiny", dtype=torch.bfloat16)[0]) == model_fingerprint(
        load_base_model("tiny")[0]
    )
