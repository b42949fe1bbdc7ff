"""Conversations: parsing chat rows and rendering them with the tokenizer's chat template, as TRL does.

Two conversational layouts are read (``llmeraser.data.example_from_json`` dispatches here):

- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (also under ``conversations``, and ShareGPT's
  ``from``/``value`` keys, whose ``human``/``gpt`` roles become ``user``/``assistant``: TRL renames the
  keys but keeps the role names, so a template would render ``human`` where we render ``user``);
- TRL's conversational prompt/completion: ``{"prompt": [messages], "completion": [messages]}``.

Tokens come from ``tokenizer.apply_chat_template`` exactly as TRL's ``SFTTrainer`` calls it (trl 1.16,
``trl/trainer/sft_trainer.py``): the whole conversation rendered without a generation prompt is the
sequence; for prompt/completion, the prompt rendered with ``add_generation_prompt=True`` marks where the
completion starts (at the longest common prefix of the two, as TRL's ``common_prefix_length``). An
assistant turn k of a ``messages`` conversation spans the tokens between ``messages[:k]`` rendered with
the generation prompt and ``messages[:k+1]`` rendered without: both must be prefixes of the whole
rendering, or the template is not prefix-consistent and the row is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmeraser.errors import InputError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
"""ShareGPT role names (``from`` keys) and the roles they become."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``role`` (``system``, ``user``, ``assistant``, …) and its text."""

    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def is_message_list(value: Any) -> bool:
    """Whether ``value`` looks like a list of chat messages (a non-empty list whose first item is a mapping)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict)


def parse_messages(value: Any, key: str, path: str | Path, line: int | None) -> tuple[Message, ...]:
    """Parse the list of messages in field ``key``; errors name the file, line, field and message index.
    A message may hold only its role and content keys (others would change what the template renders),
    save keys whose value is null."""
    if not isinstance(value, (list, tuple)):
        raise InputError(f"field '{key}' must be a list of messages, got {type(value).__name__}", path, line)
    if not value:
        raise InputError(f"field '{key}' is an empty list of messages", path, line)
    messages = []
    for index, item in enumerate(value):
        where = f"field '{key}' message {index}"
        if not isinstance(item, dict):
            raise InputError(f"{where} must be an object with 'role' and 'content', got {type(item).__name__}", path, line)
        sharegpt = "from" in item or "value" in item
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        # A null key is a table's artefact (Parquet, datasets: a struct column has every row's keys): ignored.
        unknown = sorted(k for k in set(item) - {role_key, content_key} if item[k] is not None)
        if unknown:
            raise InputError(
                f"{where}: unsupported key(s) {', '.join(repr(k) for k in unknown)} (only '{role_key}' and "
                f"'{content_key}' are read; the chat template would render the others)",
                path,
                line,
            )
        for needed in (role_key, content_key):
            if needed not in item:
                raise InputError(f"{where}: missing '{needed}'", path, line)
        role, content = item[role_key], item[content_key]
        if not isinstance(role, str) or not role.strip():
            raise InputError(f"{where}: '{role_key}' must be a non-empty string, got {role!r}", path, line)
        if not isinstance(content, str):
            raise InputError(f"{where}: '{content_key}' must be a string, got {type(content).__name__}", path, line)
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"{where}: contains an unpaired surrogate escape (character {err.start})", path, line) from None
        messages.append(Message(SHAREGPT_ROLES.get(role, role) if sharegpt else role, content))
    return tuple(messages)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (``tokenizer.chat_template``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, example_id: str) -> None:
    if not has_chat_template(tokenizer):
        raise InputError(
            f"example '{example_id}' is a conversation but the tokenizer has no chat template "
            "(tokenizer.chat_template is not set): set one, or give prompt/response rows"
        )


def render_ids(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool, example_id: str = "?"
) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template (TRL's call: ``tokenize=True``, ``return_dict=True``)."""
    try:
        result = tokenizer.apply_chat_template(
            [m.to_json() for m in messages], tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # a template raises whatever Jinja or its own raise_exception() raises
        raise InputError(
            f"example '{example_id}': the chat template failed on turns 0..{len(messages) - 1}: {err}"
        ) from None
    return list(result["input_ids"])


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share (TRL's rule for where a completion starts)."""
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


def assistant_span(
    tokenizer: Any, messages: Sequence[Message], turn: int, full_ids: Sequence[int], example_id: str
) -> tuple[int, int]:
    """``(start, end)``: the token positions of assistant turn ``turn`` (its content and the template's end
    of turn) in ``full_ids``, the whole conversation rendered. Raises ``InputError`` when the template is not
    prefix-consistent there (its rendering of the earlier turns is not a prefix of the later ones)."""
    before = render_ids(tokenizer, messages[:turn], True, example_id)
    through = full_ids if turn == len(messages) - 1 else render_ids(tokenizer, messages[: turn + 1], False, example_id)
    if list(through) != list(full_ids[: len(through)]) or list(before) != list(through[: len(before)]):
        raise InputError(
            f"example '{example_id}': the chat template is not prefix-consistent at turn {turn} (rendering the "
            "conversation up to that turn does not give a prefix of the whole conversation's tokens), so the "
            "assistant turns cannot be located; use loss scope 'all', or the prompt/completion layout"
        )
    if len(through) <= len(before):
        raise InputError(f"example '{example_id}': assistant turn {turn} renders to no tokens")
    return len(before), len(through)
