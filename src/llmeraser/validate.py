"""Input checks that need the tokenizer or the model: does every example fit the context?

The training recipe's truncation policy (``llmeraser.data.tokenize_example``): an example longer than
``max_length`` tokens has its prompt (the tokens before the first loss token) cut from the left; a
response (the tokens from the first loss token on) that alone does not fit is an error.
``max_length`` itself may not exceed the model's context window (``max_position_embeddings``). These
checks run before any computation, and their errors name the data or request file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmeraser.data import ID_COLUMNS, Example, FitError, TokenizationConfig, row_id, tokenize_example
from llmeraser.errors import InputError
from llmeraser.requests import CorrectResponse, Request
from llmeraser.sources import iter_rows


def context_limit(model: Any) -> int | None:
    """The model's context window in tokens (``config.max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_max_length(max_length: int, model: Any, source: str = "`max_length`") -> None:
    """Refuse a ``max_length`` below 2 or beyond the model's context window."""
    if max_length < 2:
        raise InputError(f"max_length must be at least 2 tokens, got {max_length} ({source})")
    limit = context_limit(model)
    if limit is not None and max_length > limit:
        raise InputError(
            f"max_length {max_length} ({source}) exceeds the model's context window "
            f"(max_position_embeddings = {limit}); use `max_length={limit}` or less"
        )


def line_of_id(path: str | Path, example_id: str) -> int | None:
    """The line of ``path`` (JSONL, CSV) holding the example ``example_id``, streamed; None if not found
    or if the format has no lines (JSON, Parquet: see ``row_of_id``)."""
    return _location_of_id(path, example_id)[0]


def row_of_id(path: str | Path, example_id: str) -> int | None:
    """The 0-based row of ``path`` holding the example ``example_id``; None if not found."""
    return _location_of_id(path, example_id)[1]


def _location_of_id(path: str | Path, example_id: str) -> tuple[int | None, int | None]:
    id_key: str | None = None
    for row, line, obj in iter_rows(path):
        if row == 0:
            id_key = next((key for key in ID_COLUMNS if key in obj), None)
        value = obj.get(id_key) if id_key is not None else row_id(row)
        if value is not None and str(value) == example_id:
            return line, row
    return None, None


def _fit_error(err: InputError, max_length: int, limit: int | None) -> str:
    allowed = f" (the model allows up to {limit})" if limit else ""
    return (
        f"{err.message}; prompts are cut from the left to fit max_length (the training recipe's policy) but "
        f"a response must fit whole: shorten it or raise `max_length`{allowed}"
    )


def _data_error(message: str, data_path: str | Path | None, example_id: str) -> InputError:
    """``message`` located at the example's line (JSONL, CSV) or row (JSON, Parquet) of ``data_path``."""
    if data_path is None:
        return InputError(message)
    line, row = _location_of_id(data_path, example_id)
    if line is None and row is not None:
        return InputError(f"row {row}: {message}", data_path)
    return InputError(message, data_path, line)


def check_examples_fit(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    data_path: str | Path | None = None,
    requests: Sequence[Request] = (),
    model: Any = None,
    loss_scope: str = "response",
) -> int:
    """Raise ``InputError`` naming the file and line of the first response that cannot fit ``max_length``
    tokens (replacement responses of ``requests`` first, then ``examples``), or of the first conversation
    the tokenizer cannot render (no chat template, a template that is not prefix-consistent); return how
    many examples will have their prompt cut from the left."""
    config = TokenizationConfig(max_length=max_length, loss_scope=loss_scope)
    limit = context_limit(model) if model is not None else None
    by_id = {example.id: example for example in examples}
    for request in requests:
        if isinstance(request, CorrectResponse):
            target = by_id.get(request.id)
            conversation = target is not None and target.is_conversation
            try:
                edited = request.apply(target) if conversation else Example(request.id, " ", request.response)  # type: ignore[arg-type]
                tokenize_example(tokenizer, edited, config)
            except InputError as err:
                if conversation and not isinstance(err, FitError):
                    raise InputError(err.message, request.source.path, request.source.line) from None
                raise InputError(_fit_error(err, max_length, limit), request.source.path, request.source.line) from None
    truncated = 0
    for example in examples:
        try:
            truncated += tokenize_example(tokenizer, example, config).truncated
        except InputError as err:
            message = (err.message if example.is_conversation and not isinstance(err, FitError)
                       else _fit_error(err, max_length, limit))
            raise _data_error(message, data_path, example.id) from None
    return truncated


def truncation_note(n_truncated: int, n_examples: int, max_length: int) -> str | None:
    """The console line saying how many examples ``check_examples_fit`` found longer than ``max_length``
    (their prompts cut from the left), or None when none is."""
    if n_truncated == 0:
        return None
    which = "example is" if n_examples == 1 else "examples is" if n_truncated == 1 else "examples are"
    return (f"note: {n_truncated} of {n_examples} {which} longer than max_length {max_length} tokens: the tokens "
            "before each one's response (its prompt) are cut from the left to fit, as in training "
            "(raise `max_length` to keep them)")
