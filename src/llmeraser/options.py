"""One declaration per option: a config dataclass field carries its type (``Literal`` choices), default,
help text and bounds; ``validate`` checks an instance against them, and the CLI generates its flags from
the same fields (``llmeraser.cli.flags``).

    @dataclass
    class MyConfig:
        solver: Literal["cg", "direct"] = option("cg", help="inverse-HVP solver")
        damping: float = option(1e-2, help="λ added to H", min=0.0)

        def __post_init__(self) -> None:
            validate(self)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from llmeraser.errors import ConfigError

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str,  # noqa: A002 (argparse's name)
    min: float | None = None,  # noqa: A002
    gt: float | None = None,
    default_factory: Any = _NO_DEFAULT,
    open_choices: bool = False,
    choices: Callable[[], Sequence[Any]] | None = None,
) -> Any:
    """A dataclass field with its help text and bounds: ``min`` (value >= min, finite) or ``gt`` (value > gt,
    finite; of each value of a tuple field); None is always allowed where the type allows it.
    ``open_choices``: the ``Literal`` lists the values llmeraser runs (the CLI's choices), but a record may
    hold others (an adapter trained outside llmeraser: ``adamw``, ``cosine``), which ``validate`` accepts
    and the code that runs them refuses. ``choices``: for a ``str`` field whose values are known only at
    run time (a registry), the function that lists them when asked."""
    metadata = {"help": help, "min": min, "gt": gt, "open_choices": open_choices, "choices": choices}
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether None is allowed)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def field_type(cls: type, name: str) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """(the scalar type, the choices (``Literal`` or ``option(choices=)``) or None, whether None is allowed)
    of ``cls``'s field ``name``."""
    hint, optional = _strip_optional(_hints(cls)[name])
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, optional
    listed = _field(cls, name).metadata.get("choices")
    return hint, (tuple(listed()) if listed else None), optional


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _hints(cls: type) -> dict[str, Any]:
    import sys

    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(module))


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The choices of ``cls``'s field ``name``."""
    found = field_type(cls, name)[1]
    if found is None:
        raise TypeError(f"{cls.__name__}.{name} declares no choices")
    return found


def declared(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of ``cls`` declared with ``option`` (those with help text)."""
    return (f for f in dataclasses.fields(cls) if "help" in f.metadata)


def field_help(cls: type, name: str) -> str:
    return _field(cls, name).metadata["help"]


def bounds_text(f: dataclasses.Field) -> str | None:
    """``>= 0`` / ``> 0`` for a bounded field, else None."""
    if f.metadata.get("min") is not None:
        return f">= {f.metadata['min']:g}"
    if f.metadata.get("gt") is not None:
        return f"> {f.metadata['gt']:g}"
    return None


def check_field(cls: type, name: str, value: Any) -> None:
    """Raise ``ConfigError(name, ...)`` unless ``value`` is within ``cls``'s declaration of field ``name``
    (a tuple: each of its values within the bounds)."""
    f = _field(cls, name)
    _, choices, optional = field_type(cls, name)
    if value is None:
        if optional or choices is None and f.default is None:
            return
        raise ConfigError(name, "must be given, got None")
    if choices is not None and value not in choices and not f.metadata.get("open_choices"):
        raise ConfigError(name, f"must be one of: {', '.join(map(str, choices))}, got {value!r}")
    low, above = f.metadata.get("min"), f.metadata.get("gt")
    if low is None and above is None:
        return

    def within(v: Any) -> bool:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return number and math.isfinite(v) and (low is None or v >= low) and (above is None or v > above)

    if isinstance(value, tuple) and not all(within(v) for v in value):
        raise ConfigError(name, f"must hold values {bounds_text(f)}, got {value}")
    if not isinstance(value, tuple) and not within(value):
        raise ConfigError(name, f"must be {bounds_text(f)}, got {value}")


def validate(config: Any) -> None:
    """``check_field`` on every declared field of the dataclass instance ``config`` (from ``__post_init__``)."""
    cls = type(config)
    for f in declared(cls):
        check_field(cls, f.name, getattr(config, f.name))


def to_toml(top: dict[str, Any], tables: dict[str, dict[str, Any]], comment: str = "") -> str:
    """TOML of top-level keys ``top`` and ``{table: {key: value}}`` whose values are str, int, float, bool or
    lists of them (None is left out: TOML has no null, and an absent key means the default)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{key} = {_toml_value(value)}" for key, value in top.items() if value is not None]
    lines.append("")
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"not a TOML value: {value!r}")
