"""Input checks that need the tokenizer or the model: does every example fit the context?

The training recipe's truncation policy (``llmeraser.data.tokenize_example``): an example longer than
``max_length`` tokens has its prompt cut from the left; a response that alone does not fit is an error.
``max_length`` itself may not exceed the model's context window (``max_position_embeddings``). These
checks run before any computation, and their errors name the data or request file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmeraser.data import Example, TokenizationConfig, tokenize_example
from llmeraser.errors import InputError
from llmeraser.jsonl import iter_jsonl
from llmeraser.requests import CorrectResponse, Request


def context_limit(model: Any) -> int | None:
    """The model's context window in tokens (``config.max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_max_length(max_length: int, model: Any, source: str = "--max-length") -> None:
    """Refuse a ``max_length`` below 2 or beyond the model's context window."""
    if max_length < 2:
        raise InputError(f"max_length must be at least 2 tokens, got {max_length} ({source})")
    limit = context_limit(model)
    if limit is not None and max_length > limit:
        raise InputError(
            f"max_length {max_length} ({source}) exceeds the model's context window "
            f"(max_position_embeddings = {limit}); use --max-length {limit} or less"
        )


def line_of_id(path: str | Path, example_id: str) -> int | None:
    """The line of ``path`` (JSONL) holding the example ``example_id``, streamed; None if not found."""
    for line, obj in iter_jsonl(path):
        value = obj.get("id")
        if value is not None and str(value) == example_id:
            return line
    return None


def _fit_error(err: InputError, max_length: int, limit: int | None) -> str:
    allowed = f" (the model allows up to {limit})" if limit else ""
    return (
        f"{err.message}; prompts are cut from the left to fit max_length (the training recipe's policy) but "
        f"a response must fit whole: shorten it or raise --max-length{allowed}"
    )


def check_examples_fit(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    data_path: str | Path | None = None,
    requests: Sequence[Request] = (),
    model: Any = None,
) -> int:
    """Raise ``InputError`` naming the file and line of the first response that cannot fit ``max_length``
    tokens (replacement responses of ``requests`` first, then ``examples``); return how many examples
    will have their prompt cut from the left."""
    config = TokenizationConfig(max_length=max_length)
    limit = context_limit(model) if model is not None else None
    for request in requests:
        if isinstance(request, CorrectResponse):
            try:
                tokenize_example(tokenizer, Example(request.id, " ", request.response), config)
            except InputError as err:
                raise InputError(_fit_error(err, max_length, limit), request.source.path, request.source.line) from None
    truncated = 0
    for example in examples:
        try:
            truncated += tokenize_example(tokenizer, example, config).truncated
        except InputError as err:
            line = line_of_id(data_path, example.id) if data_path is not None else None
            raise InputError(_fit_error(err, max_length, limit), data_path, line) from None
    return truncated
