"""Shared fixtures: the tiny random-init model (float64 for tight numerical comparisons) and toy data."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

# Tests never reach a model hub: fail fast instead of waiting on the network. Set before anything imports
# huggingface_hub (it reads these once); subprocesses inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# On a pytest-xdist worker (scripts/test.sh): one thread each, here and in the subprocesses the tests
# start, so that the workers, one per core, do not contend for the cores (set before torch is imported).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmeraser.adapter import AdapterParameters, LoraSettings, attach_lora  # noqa: E402
from llmeraser.data import Example  # noqa: E402
from llmeraser.models import load_base_model  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)


# Under pytest-xdist with --dist loadfile (scripts/test.sh) each module runs on one worker, so that its
# module-scoped fixtures are built once; the tests of these modules (long, sharing no such fixture) are
# scheduled one by one instead, each to whichever worker is free.
SPREAD_BY_TEST = {"tests/test_bench.py", "tests/test_distributed.py"}
SHARED_SCOPES = {"module", "class", "package"}


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadfile, except that the modules of ``SPREAD_BY_TEST`` are scheduled test by test."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileSpreading(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD_BY_TEST else module

    return LoadFileSpreading(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module of ``SPREAD_BY_TEST`` whose tests share a module-scoped fixture is an error: spread over
    workers, the fixture would be built on each (and the tests could not rely on running in order)."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        info = getattr(item, "_fixtureinfo", None)
        if module not in SPREAD_BY_TEST or info is None:
            continue
        for name in item.fixturenames:
            definitions = info.name2fixturedefs.get(name, ())
            if definitions and definitions[-1].scope in SHARED_SCOPES:
                raise pytest.UsageError(f"{module} is in SPREAD_BY_TEST (tests/conftest.py) but {item.name} uses the "
                                        f"{definitions[-1].scope}-scoped fixture '{name}': take it out of SPREAD_BY_TEST")


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


@contextlib.contextmanager
def exact_float64_llama():
    """LLaMA's RMSNorm and eager attention computed in the input dtype (not float32) while active."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        return torch.matmul(weights, value_states).transpose(1, 2).contiguous(), weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
        patch.setattr(modeling_llama, "eager_attention_forward", eager_attention)
        yield


@contextlib.contextmanager
def one_thread():
    """Tiny-model ops gain nothing from intra-op threads, and with 2 threads on 2 cores any other busy
    process stalls every parallel region (10-100x slower); run single-threaded while active."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def perturbed_model(target_modules, r, seed=0, scale=0.5, freeze_lora_a=False):
    """The tiny model with θ moved to a random point (lora_B ≠ 0, so no block of the curvature vanishes)."""
    model, tokenizer = tiny_lora_model(target_modules=target_modules, r=r, seed=seed)
    if freeze_lora_a:
        for name, tensor in model.named_parameters():
            if "lora_A" in name:
                tensor.requires_grad_(False)
    params = AdapterParameters.of(model)
    generator = torch.Generator().manual_seed(100 + seed)
    params.assign(scale * torch.randn(params.dim, generator=generator, dtype=torch.float64))
    return model, tokenizer, params


def pad_rows(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``labels`` rows into a batch: the data collator the tests give an HF
    ``Trainer`` (written without llmeraser, as a user's own would be; labels padded with -100)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        labels[k, : len(row["labels"])] = torch.tensor(row["labels"])
        mask[k, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
