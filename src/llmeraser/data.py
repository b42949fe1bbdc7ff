"""Training examples: reading, tokenisation, batching, and the one per-example loss used everywhere.

Every stage (training, gradients, Hessian-vector products, evaluation) calls ``response_nll`` /
``example_losses`` so that masking and averaging can never disagree: the loss of an example is the mean
negative log-likelihood (nats per token) of its response tokens given its prompt; prompt and padding
positions are masked out.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmeraser.errors import InputError
from llmeraser.jsonl import iter_jsonl, require_str, write_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` is the query x, ``response`` the answer y."""

    id: str
    prompt: str
    response: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "prompt": self.prompt, "response": self.response}


def example_from_json(obj: dict[str, Any], path: str | Path, line: int) -> Example:
    """Parse one data line. Accepts ``prompt``/``response``, ``prompt``/``completion`` and the Alpaca
    layout ``instruction`` [+ ``input``] / ``output`` (prompt = instruction, a blank line, input)."""
    example_id = require_str(obj, "id", path, line, allow_int=True)
    if "prompt" in obj:
        prompt = require_str(obj, "prompt", path, line)
        response_key = "completion" if "completion" in obj and "response" not in obj else "response"
        response = require_str(obj, response_key, path, line)
    elif "instruction" in obj:
        prompt = require_str(obj, "instruction", path, line)
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise InputError(f"field 'input' must be a string, got {type(extra).__name__}", path, line)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        response = require_str(obj, "output", path, line)
    else:
        raise InputError("missing field 'prompt' (or 'instruction' in the Alpaca layout)", path, line)
    return Example(example_id, prompt, response)


def read_examples(path: str | Path) -> list[Example]:
    """Read a JSONL data file; ids must be unique. Errors name the file and line."""
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        example = example_from_json(obj, path, line)
        if example.id in first_line:
            raise InputError(f"duplicate id '{example.id}' (first seen on line {first_line[example.id]})", path, line)
        first_line[example.id] = line
        examples.append(example)
    if not examples:
        raise InputError("no examples in file", path)
    return examples


def write_examples(path: str | Path, examples: Sequence[Example]) -> None:
    """Write examples as JSONL (atomically)."""
    write_jsonl(path, (e.to_json() for e in examples))


@dataclass(frozen=True)
class TokenizationConfig:
    """How an example becomes tokens: prompt tokens (with the tokenizer's special prefix, if any), then
    response tokens, then EOS if ``append_eos``. Longer than ``max_length``: the prompt is cut from the left."""

    max_length: int = 256
    append_eos: bool = True


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` = prompt + response tokens; ``prompt_length`` counts the prompt tokens kept."""

    input_ids: tuple[int, ...]
    prompt_length: int
    truncated: bool = False


def tokenize_example(tokenizer: Any, example: Example, config: TokenizationConfig) -> TokenizedExample:
    """Tokenise prompt and response separately, so that an edit of one never shifts the other's tokens."""
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if config.append_eos and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        raise InputError(f"example '{example.id}': the response tokenises to nothing")
    if len(response_ids) >= config.max_length:
        raise InputError(
            f"example '{example.id}': response is {len(response_ids)} tokens, max_length is {config.max_length}"
        )
    truncated = len(prompt_ids) + len(response_ids) > config.max_length
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) + len(response_ids) - config.max_length :]
    return TokenizedExample(tuple(prompt_ids + response_ids), len(prompt_ids), truncated)


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], config: TokenizationConfig
) -> list[TokenizedExample]:
    """``tokenize_example`` over a list."""
    return [tokenize_example(tokenizer, example, config) for example in examples]


class TokenizedOnDemand(Sequence[TokenizedExample]):
    """``tokenize_examples(tokenizer, examples, config)``, run on the first access to an item. The length
    is known without tokenising, so a consumer that only counts the examples (erase's calibrated direct
    solve, which never multiplies by the curvature) does not pay for tokenising the training set."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], config: TokenizationConfig) -> None:
        self.tokenizer, self.examples, self.config = tokenizer, list(examples), config
        self._items: list[TokenizedExample] | None = None

    @property
    def tokenized(self) -> bool:
        """Whether the items have been tokenised (read) yet."""
        return self._items is not None

    def items(self) -> list[TokenizedExample]:
        if self._items is None:
            self._items = tokenize_examples(self.tokenizer, self.examples, self.config)
        return self._items

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: Any) -> Any:
        return self.items()[index]


def collate(items: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad a list of tokenised examples into a batch.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (B, L) with prompt and padding labels set to
    ``IGNORE_INDEX``, ``answer_positions`` (B,): the index of the last prompt token, whose logits
    predict the first response token, and ``logits_start``: the smallest of them.
    """
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, item.prompt_length : len(ids)] = ids[item.prompt_length :]
    answer_positions = torch.tensor([item.prompt_length - 1 for item in items], dtype=torch.long)
    return {
        "logits_start": answer_positions.min(),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "answer_positions": answer_positions,
    }


def iter_batches(
    items: Sequence[TokenizedExample], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, Tensor]]:
    """Consecutive batches of at most ``batch_size`` items, in order."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_token_id)


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Targets aligned with logits positions: ``targets[:, t] = labels[:, t+1]``.

    Returns ``(targets, weights)`` of shape (B, L-1); ``weights`` is 1/T_i on the T_i response positions
    of example i and 0 elsewhere, so that ``(weights * token_nll).sum(1)`` is the per-example mean.
    """
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).to(torch.float64)  # float64: 1/T_i exact to the caller's precision
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    return targets, mask / counts


def response_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example mean NLL of the response tokens, shape (B,), in nats per token.

    ``logits`` (B, L, V) from a causal LM on the batch's ``input_ids``; ``labels`` (B, L) with
    ``IGNORE_INDEX`` on prompt and padding positions.
    """
    targets, weights = shifted_targets(labels)
    logits = logits[:, :-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # upcast half precision only; float64 models keep float64 losses
    token_nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.clamp_min(0).reshape(-1),
        reduction="none",
    ).view(targets.shape)
    return (token_nll * weights.to(token_nll.dtype)).sum(dim=1)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (base) causal LM's forward takes ``logits_to_keep`` (most Hugging Face LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def model_inputs(batch: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """The keyword arguments a causal LM takes from a batch of ``collate``.

    Where the model supports it, logits are computed only from position ``logits_start`` on (the last
    prompt token of the shortest prompt): the positions before cannot predict a response token, and the
    vocabulary projection of every position is a large share of the cost for short responses.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if accepts_logits_to_keep(model):
        start = int(batch["logits_start"])
        inputs["logits_to_keep"] = torch.arange(start, batch["input_ids"].shape[1])
    return inputs


def aligned_labels(batch: dict[str, Tensor], model: torch.nn.Module) -> Tensor:
    """``labels`` cut to the positions whose logits ``model_inputs`` keeps, shape (B, L − start)."""
    return batch["labels"][:, int(batch["logits_start"]) :] if accepts_logits_to_keep(model) else batch["labels"]


def forward_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` on the kept positions: feed them to ``response_nll`` / ``shifted_targets``."""
    return model(**model_inputs(batch, model)).logits, aligned_labels(batch, model)


def example_losses(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Run ``model`` on a batch and return the per-example response loss, shape (B,)."""
    return response_nll(*forward_logits(model, batch))
