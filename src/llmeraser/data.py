"""Training examples: reading, tokenisation, batching, and the one per-example loss used everywhere.

Every stage (training, gradients, Hessian-vector products, evaluation) calls ``response_nll`` /
``example_losses`` so that masking and averaging can never disagree: the loss of an example is the mean
negative log-likelihood (nats per token) of its loss tokens given what precedes them. Which tokens those
are is ``TokenizationConfig.loss_scope`` (default ``response``: the response tokens; prompt and padding
positions are masked out), applied once, in ``tokenize_example``.

Examples are prompt/response pairs or conversations (``llmeraser.chat``), read from JSONL, JSON, CSV or
Parquet files (``read_examples``) or from rows in memory (``examples_from_rows``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from llmeraser.chat import (
    Message,
    assistant_span,
    common_prefix_length,
    parse_messages,
    render_ids,
    require_chat_template,
)
from llmeraser.errors import InputError
from llmeraser.jsonl import require_str, write_jsonl
from llmeraser.sources import data_format, iter_rows

IGNORE_INDEX = -100


LossScope = Literal["response", "assistant", "all"]
LOSS_SCOPES: tuple[str, ...] = get_args(LossScope)
"""Which tokens carry the loss: ``response`` the response (a conversation's last assistant turn, or TRL's
completion), ``assistant`` every assistant turn, ``all`` every non-pad token."""

ID_COLUMNS = ("id", "example_id", "uid", "idx")
"""Fields an example id is read from, the first present in the first row; without any, ids are row numbers."""


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` is the query x, ``response`` the answer y.

    A conversation (build it with ``Example.conversation``) carries ``messages``; in TRL's conversational
    prompt/completion layout ``prompt_turns`` says how many leading messages are the prompt (the rest is
    the completion), and it is None for the ``messages`` layout. A conversation's ``prompt`` and
    ``response`` are views, set from the messages: the content of the last user turn before the last
    assistant turn (or ``""``), and the content of the last assistant turn.
    """

    id: str
    prompt: str = ""
    response: str = ""
    messages: tuple[Message, ...] | None = None
    prompt_turns: int | None = None

    def __post_init__(self) -> None:
        if self.messages is None:
            if self.prompt_turns is not None:
                raise ValueError("prompt_turns is only meaningful for a conversation")
            return
        if not self.messages or not all(isinstance(m, Message) for m in self.messages):
            raise ValueError("messages must be a non-empty sequence of Message")
        if not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))
        if self.prompt_turns is not None and not 1 <= self.prompt_turns < len(self.messages):
            raise ValueError(f"prompt_turns must be in [1, {len(self.messages) - 1}], got {self.prompt_turns}")
        prompt, response = _conversation_views(self.messages, self.id)
        for name, given, derived in (("prompt", self.prompt, prompt), ("response", self.response, response)):
            if given not in ("", derived):
                raise ValueError(f"a conversation's {name} is set from its messages; got {given!r}, not {derived!r}")
            object.__setattr__(self, name, derived)

    @classmethod
    def conversation(cls, id: str, messages: Sequence[Message], prompt_turns: int | None = None) -> Example:
        """A conversational example; ``prompt_turns`` for TRL's prompt/completion layout, else None."""
        return cls(id, messages=tuple(messages), prompt_turns=prompt_turns)

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    def with_prompt(self, prompt: str, turn: int | None = None) -> Example:
        """The example with its prompt replaced; for a conversation, the content of message ``turn`` (a
        non-assistant turn; default: the last user turn before the last assistant turn)."""
        if self.messages is None:
            if turn is not None:
                raise InputError(f"example '{self.id}' is not a conversation: 'turn' does not apply")
            return Example(self.id, prompt, self.response)
        if turn is None:
            turn = _last_user_turn(self.messages)
            if turn is None:
                raise InputError(f"example '{self.id}' has no user turn before its last assistant turn to modify")
        self._check_turn(turn, assistant=False)
        return self._replace_turn(turn, prompt)

    def with_response(self, response: str, turn: int | None = None) -> Example:
        """The example with its response replaced; for a conversation, the content of message ``turn`` (an
        assistant turn; default: the last assistant turn)."""
        if self.messages is None:
            if turn is not None:
                raise InputError(f"example '{self.id}' is not a conversation: 'turn' does not apply")
            return Example(self.id, self.prompt, response)
        if turn is None:
            turn = _last_assistant_turn(self.messages)
        self._check_turn(turn, assistant=True)
        return self._replace_turn(turn, response)

    def _check_turn(self, turn: int, assistant: bool) -> None:
        assert self.messages is not None
        if not 0 <= turn < len(self.messages):
            raise InputError(
                f"example '{self.id}': turn {turn} is out of range (the conversation has {len(self.messages)} "
                f"messages, turns 0..{len(self.messages) - 1})"
            )
        role = self.messages[turn].role
        if assistant != (role == "assistant"):
            wanted = "an assistant turn" if assistant else "a non-assistant (user or system) turn"
            raise InputError(f"example '{self.id}': turn {turn} is a {role!r} message, expected {wanted}")

    def _replace_turn(self, turn: int, content: str) -> Example:
        assert self.messages is not None
        messages = list(self.messages)
        messages[turn] = Message(messages[turn].role, content)
        return Example.conversation(self.id, messages, self.prompt_turns)

    def to_json(self) -> dict[str, Any]:
        if self.messages is None:
            return {"id": self.id, "prompt": self.prompt, "response": self.response}
        turns = [m.to_json() for m in self.messages]
        if self.prompt_turns is None:
            return {"id": self.id, "messages": turns}
        return {"id": self.id, "prompt": turns[: self.prompt_turns], "completion": turns[self.prompt_turns :]}


def _last_assistant_turn(messages: Sequence[Message]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant":
            return index
    raise InputError("the conversation has no assistant turn")


def _last_user_turn(messages: Sequence[Message]) -> int | None:
    for index in range(_last_assistant_turn(messages) - 1, -1, -1):
        if messages[index].role == "user":
            return index
    return None


def _conversation_views(messages: Sequence[Message], example_id: str) -> tuple[str, str]:
    try:
        answer = _last_assistant_turn(messages)
    except InputError:
        raise ValueError(f"example '{example_id}': a conversation needs an assistant turn") from None
    user = _last_user_turn(messages)
    return (messages[user].content if user is not None else ""), messages[answer].content


def example_from_json(
    obj: dict[str, Any], path: str | Path, line: int | None, id_key: str | None = "id", row_id: str | None = None
) -> Example:
    """Parse one data row. Accepts ``prompt``/``response``, ``prompt``/``completion`` (strings, or TRL's
    conversational lists of messages), the Alpaca layout ``instruction`` [+ ``input``] / ``output``
    (prompt = instruction, a blank line, input), and ``messages`` / ``conversations`` (lists of messages).
    The id is field ``id_key``, or ``row_id`` when ``id_key`` is None."""
    example_id = require_str(obj, id_key, path, line, allow_int=True) if id_key is not None else str(row_id)
    chat_keys = [key for key in ("messages", "conversations") if key in obj]
    if len(chat_keys) == 2:
        raise InputError("both 'messages' and 'conversations' given (ambiguous)", path, line)
    if chat_keys:
        messages = parse_messages(obj[chat_keys[0]], chat_keys[0], path, line)
        if not any(m.role == "assistant" for m in messages):
            raise InputError(f"field '{chat_keys[0]}' has no assistant turn", path, line)
        return Example.conversation(example_id, messages)
    if "prompt" in obj and isinstance(obj["prompt"], (list, tuple)):
        prompt_messages = parse_messages(obj["prompt"], "prompt", path, line)
        if "completion" not in obj:
            raise InputError("missing field 'completion' (a list of messages, as the prompt is)", path, line)
        completion = parse_messages(obj["completion"], "completion", path, line)
        if not any(m.role == "assistant" for m in completion):
            raise InputError("field 'completion' has no assistant turn", path, line)
        return Example.conversation(example_id, prompt_messages + completion, prompt_turns=len(prompt_messages))
    if "prompt" in obj:
        prompt = require_str(obj, "prompt", path, line)
        response_key = "completion" if "completion" in obj and "response" not in obj else "response"
        response = require_str(obj, response_key, path, line)
    elif "instruction" in obj:
        prompt = require_str(obj, "instruction", path, line)
        extra = obj.get("input", "")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise InputError(f"field 'input' must be a string, got {type(extra).__name__}", path, line)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        response = require_str(obj, "output", path, line)
    else:
        raise InputError("missing field 'prompt' (or 'instruction' in the Alpaca layout)", path, line)
    return Example(example_id, prompt, response)


class Examples(list[Example]):
    """The examples read from one source, in order; ``ids_from_row_numbers`` tells whether their ids
    were made from row numbers (``row-<n>``, 0-based) because the rows carry no id field."""

    def __init__(self, examples: Sequence[Example] = (), source: str | None = None, ids_from_row_numbers: bool = False):
        super().__init__(examples)
        self.source = source
        self.ids_from_row_numbers = ids_from_row_numbers


def row_id(row: int) -> str:
    """The id of the ``row``-th (0-based) data row when the rows carry none."""
    return f"row-{row}"


def _required_columns(columns: Sequence[str]) -> str | None:
    """What a table with these columns lacks for any accepted layout (a message), or None."""
    have = set(columns)
    if have & {"messages", "conversations"}:
        return None
    if "prompt" in have:
        return None if have & {"response", "completion"} else "missing column 'response' (or 'completion')"
    if "instruction" in have:
        return None if "output" in have else "missing column 'output' (the Alpaca layout)"
    return "missing column 'prompt' (or 'instruction' in the Alpaca layout, or 'messages')"


TABLE_JSON_FIELDS = ("messages", "conversations")
"""Fields a table (CSV, TSV, Parquet) may hold as a JSON string: a CSV field is text, so a conversation
in a CSV file is its ``messages`` column holding the JSON list (``[{"role": "user", "content": ...}, ...]``)."""


def _decode_json_fields(obj: dict[str, Any], source: str | Path, line: int | None) -> None:
    """Parse, in place, the ``TABLE_JSON_FIELDS`` of a table row that hold a string; an empty cell (or a
    null) is an absent field, so a table may have both columns, one filled per row. Errors name the field."""
    for key in TABLE_JSON_FIELDS:
        value = obj.get(key)
        if key in obj and (value is None or (isinstance(value, str) and not value.strip())):
            del obj[key]
            continue
        if not isinstance(value, str):
            continue
        try:
            obj[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise InputError(
                f"field '{key}' is not valid JSON ({err.msg}, character {err.pos}): a table holds a conversation "
                f"as a JSON list of messages, e.g. [{{\"role\": \"user\", \"content\": \"...\"}}, ...]",
                source, line,
            ) from None
        except RecursionError:
            raise InputError(f"field '{key}' is JSON nested too deeply", source, line) from None


def _examples_from(
    rows: Iterable[tuple[int, int | None, Any]], source: str | Path, tabular: bool = False, from_file: bool = True
) -> Examples:
    """Parse ``(row, line, obj)`` rows; ``line`` None: errors name the row (``source: row n: …``).
    ``tabular``: every row has the same keys (CSV, Parquet), so a missing field is a missing column, and a
    ``messages`` / ``conversations`` field may hold its list of messages as a JSON string (``TABLE_JSON_FIELDS``)."""
    examples = Examples(source=str(source))
    first_seen: dict[str, str] = {}
    id_key: str | None = None
    for row, line, obj in rows:
        if row == 0 and tabular and isinstance(obj, Mapping):
            missing = _required_columns(list(obj))
            if missing:
                raise InputError(f"{missing}; the columns are: {', '.join(obj)}", source, 1 if line else None)
        try:
            if not isinstance(obj, Mapping):
                raise InputError(f"expected a mapping (a row object), got {type(obj).__name__}", source, line)
            obj = dict(obj)
            if tabular:
                _decode_json_fields(obj, source, line)
            if row == 0:
                id_key = next((key for key in ID_COLUMNS if key in obj), None)
                examples.ids_from_row_numbers = id_key is None
            elif id_key is None and any(key in obj for key in ID_COLUMNS):
                key = next(key for key in ID_COLUMNS if key in obj)
                raise InputError(
                    f"field '{key}' given, but the first row has no id field ({', '.join(ID_COLUMNS)}) so ids are "
                    "row numbers: give ids on every row or on none",
                    source,
                    line,
                )
            example = example_from_json(obj, source, line, id_key, row_id(row))
            if example.id in first_seen:
                raise InputError(f"duplicate id '{example.id}' (first seen on {first_seen[example.id]})", source, line)
        except InputError as err:
            if line is None:  # no line to name: name the row
                raise InputError(f"row {row}: {err.message}", source) from None
            raise
        first_seen[example.id] = f"line {line}" if line is not None else f"row {row}"
        examples.append(example)
    if not examples:
        raise InputError("no examples in file" if from_file else "no examples", source)
    return examples


def read_examples(path: str | Path) -> Examples:
    """Read a data file: JSONL (one row a line), JSON (a list of rows, or one under ``data``/``rows``/
    ``examples``), CSV/TSV (a header row; fields are strings) or Parquet, by extension (other: JSONL).

    Ids come from the first of ``ID_COLUMNS`` the first row has, and must then be on every row and unique;
    without one, ids are ``row-<n>`` (n the 0-based row index) and ``result.ids_from_row_numbers`` is True.
    Errors name the file and the line (JSONL, CSV) or the row (JSON, Parquet) and the field.
    """
    kind = data_format(path)
    return _examples_from(iter_rows(path), path, tabular=kind in ("csv", "tsv", "parquet"))


def examples_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "<rows>") -> Examples:
    """Examples from an iterable of row mappings (a list of dicts, a ``datasets.Dataset``), read as
    ``read_examples`` reads a file's rows; errors read ``<source>: row n: …`` (0-based)."""
    return _examples_from(((row, None, obj) for row, obj in enumerate(rows)), source, from_file=False)


def write_examples(path: str | Path, examples: Sequence[Example]) -> None:
    """Write examples as JSONL (atomically)."""
    write_jsonl(path, (e.to_json() for e in examples))


@dataclass(frozen=True)
class TokenizationConfig:
    """How an example becomes tokens, and which tokens carry its loss.

    A prompt/response example: prompt tokens (with the tokenizer's special prefix, if any), then response
    tokens, then EOS if ``append_eos``. A conversation: the chat template's rendering (``llmeraser.chat``;
    no EOS is appended, as TRL appends none: the template ends the turns). ``loss_scope`` (``LOSS_SCOPES``):
    ``response`` the response tokens (a conversation's last assistant turn; TRL's completion), ``assistant``
    every assistant turn, ``all`` every token. Longer than ``max_length``: tokens before the first loss
    token are cut from the left; the rest must fit.
    """

    max_length: int = 256
    append_eos: bool = True
    loss_scope: str = "response"

    def __post_init__(self) -> None:
        if self.loss_scope not in LOSS_SCOPES:
            raise InputError(f"unknown loss scope {self.loss_scope!r} (expected one of: {', '.join(LOSS_SCOPES)})")


class FitError(InputError):
    """An example whose loss tokens cannot fit ``max_length`` (whatever is cut from the left)."""


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` (L,) = the example's tokens; ``prompt_length`` counts the leading tokens that carry no
    loss (for the default scope: the prompt tokens kept; at least 1). ``loss_mask`` (L,) marks the tokens
    that carry the loss; None means every token from ``prompt_length`` on (the prompt/response case)."""

    input_ids: tuple[int, ...]
    prompt_length: int
    truncated: bool = False
    loss_mask: tuple[bool, ...] | None = None

    def loss_positions(self) -> list[int]:
        """Indices of the tokens whose prediction is in the loss (all ≥ ``prompt_length`` ≥ 1)."""
        if self.loss_mask is None:
            return list(range(self.prompt_length, len(self.input_ids)))
        return [index for index, on in enumerate(self.loss_mask) if on]


def _plain_tokens(tokenizer: Any, example: Example, config: TokenizationConfig) -> tuple[list[int], list[bool]]:
    """Prompt and response tokenised separately, so that an edit of one never shifts the other's tokens."""
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if config.append_eos and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        raise InputError(f"example '{example.id}': the response tokenises to nothing")
    if config.loss_scope == "all":
        return prompt_ids + response_ids, [True] * (len(prompt_ids) + len(response_ids))
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def _conversation_tokens(tokenizer: Any, example: Example, config: TokenizationConfig) -> tuple[list[int], list[bool]]:
    """The chat template's tokens of a conversation and its loss mask (see ``llmeraser.chat``)."""
    messages = example.messages
    assert messages is not None
    require_chat_template(tokenizer, example.id)
    ids = render_ids(tokenizer, messages, False, example.id)
    if config.loss_scope == "all":
        return ids, [True] * len(ids)
    mask = [False] * len(ids)
    if example.prompt_turns is not None and config.loss_scope == "response":
        # TRL: the completion starts where the prompt (with the generation prompt) and the whole diverge.
        prompt_ids = render_ids(tokenizer, messages[: example.prompt_turns], True, example.id)
        start = common_prefix_length(prompt_ids, ids)
        spans = [(start, len(ids))]
    else:
        turns = [k for k, m in enumerate(messages) if m.role == "assistant"]
        if config.loss_scope == "response":
            turns = turns[-1:]
        spans = [assistant_span(tokenizer, messages, k, ids, example.id) for k in turns]
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    if not any(mask):
        raise InputError(f"example '{example.id}': the response tokenises to nothing")
    return ids, mask


def tokenize_example(tokenizer: Any, example: Example, config: TokenizationConfig) -> TokenizedExample:
    """The example's tokens and loss mask (``TokenizationConfig``); the one masking rule of every stage."""
    if example.messages is None:
        ids, mask = _plain_tokens(tokenizer, example, config)
    else:
        ids, mask = _conversation_tokens(tokenizer, example, config)
    mask[0] = False  # the first token is never predicted
    first = mask.index(True) if True in mask else len(ids)
    loss_tokens = len(ids) - first
    if loss_tokens >= config.max_length:
        if example.messages is None and config.loss_scope != "all":
            raise FitError(f"example '{example.id}': response is {loss_tokens} tokens, max_length is {config.max_length}")
        raise FitError(
            f"example '{example.id}': its tokens from the first loss token on are {loss_tokens} "
            f"(loss scope '{config.loss_scope}'), max_length is {config.max_length}"
        )
    truncated = len(ids) > config.max_length
    if truncated:
        cut = len(ids) - config.max_length
        ids, mask, first = ids[cut:], mask[cut:], first - cut
    contiguous = all(mask[first:])
    return TokenizedExample(tuple(ids), first, truncated, None if contiguous else tuple(mask))


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

    Returns ``input_ids``, ``attention_mask``, ``labels`` (B, L) with ``IGNORE_INDEX`` wherever a token
    carries no loss (prompt, padding, and whatever the loss scope leaves out), ``answer_positions`` (B,): the
    index of the token before the first loss token (for the default scope: the last prompt token, whose
    logits predict the first response token), and ``logits_start``: the smallest of them.
    """
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        if item.loss_mask is None:
            labels[row, item.prompt_length : len(ids)] = ids[item.prompt_length :]
        else:
            on = torch.tensor(item.loss_mask, dtype=torch.bool)
            labels[row, : len(ids)] = torch.where(on, ids, torch.full_like(ids, IGNORE_INDEX))
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
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel's
    base = get_base_model() if get_base_model is not None else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def model_inputs(batch: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The keyword arguments a causal LM takes from a batch of ``collate``.

    Where the model supports it, logits are computed only from position ``logits_start`` on (the last
    prompt token of the shortest prompt): the positions before cannot predict a response token, and the
    vocabulary projection of every position is a large share of the cost for short responses.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
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
