"""LoRA adapters: attach, load (with a shape check against the base model), save, and θ: the adapter's
trainable tensors as one flat vector (``AdapterParameters``)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.atomic import atomic_directory
from llmeraser.errors import InputError
from llmeraser.options import option, validate

SMOLLM2_NAME = "smollm2-135m"
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


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """While active, ``model`` (a PEFT model) computes as its base model, the adapter switched off; each
    parameter's ``requires_grad`` stays as it was, inside too (PEFT freezes the adapter there, and
    ``AdapterParameters`` finds θ by it)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
            yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


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
