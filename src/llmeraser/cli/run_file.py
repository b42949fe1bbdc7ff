"""``run.toml``: the resolved options every output directory gets, and ``--config FILE`` (a ``run.toml`` or
any TOML file of options) applied as a subcommand's defaults, which replays a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

from llmeraser.errors import InputError

RUN_FILE = "run.toml"
"""Written into every output directory: the command's resolved options; ``--config DIR/run.toml`` replays it."""
_NOT_REPLAYED = {"config", "out", "dry_run", "help"}  # a replay names its own --out


def _option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in _NOT_REPLAYED]


def _given_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The dests of the options set on the command line or in the ``--config`` file (the others are defaults)."""
    tokens, from_file = getattr(args, "argv", []), set(getattr(args, "config_keys", ()))
    return [a.dest for a in _option_actions(parser) if a.dest in from_file
            or any(t == o or t.startswith(o + "=") for t in tokens for o in a.option_strings)]


def _run_file_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``run.toml``: every option's resolved value, and which of them were given (what ``erase --mode auto``
    reads as configured)."""
    from llmeraser.options import to_toml

    values = {a.dest.replace("_", "-"): getattr(args, a.dest) for a in _option_actions(parser)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    given = [dest.replace("_", "-") for dest in _given_options(args, parser)]
    comment = (f"the resolved options of this run; `llmeraser {args.command} --config {RUN_FILE} "
               "--out NEW_DIR` replays it\n(given: the options set on the command line or in a config file; the "
               "others are the defaults)")
    return to_toml({"given": given}, {args.command: values}, comment)


def _run_with_run_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run the command; its output directory (rank 0; not for a dry run or a file output) gets ``run.toml``:
    inside the atomic write where the command writes the directory in one (train, erase, retrain,
    fit-curvature), else (bench, demo, make-data: written as they go) once it has finished."""
    from llmeraser.atomic import extra_files, write_text_atomic
    from llmeraser.distributed import is_main_process

    out = getattr(args, "out", None)
    if not out or getattr(args, "dry_run", False) or not is_main_process():
        args.run(args)
        return
    text = _run_file_text(args, parser)
    with extra_files(out, {RUN_FILE: text}):
        args.run(args)
    if Path(out).is_dir() and not (Path(out) / RUN_FILE).exists():
        write_text_atomic(Path(out) / RUN_FILE, text)


def _preparse(argv: Sequence[str]) -> argparse.Namespace:
    """The subcommand named in ``argv`` (``command``, None if none) and its ``--config`` file (``config``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0]


def _config_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Apply ``--config FILE`` (if given) as defaults of the chosen subcommand's parser; returns the keys
    that count as given (a ``run.toml``'s ``given`` list, else every key of the file)."""
    known = _preparse(argv)
    if not known.config or not known.command:
        return set()
    path = Path(known.config)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"malformed TOML: {err}", path) from None
    given = table.pop("given", None) if isinstance(table.get("given"), list) else None  # a run.toml
    section = table.get(known.command, {})
    values = {k: v for k, v in table.items() if not isinstance(v, dict)} | (section if isinstance(section, dict) else {})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(known.command)
    if sub is None:
        return set()
    dests = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            raise InputError(f"unknown option '{key}' for '{known.command}'", path)
        defaults[dest] = value
    sub.set_defaults(**defaults)
    for action in sub._actions:  # options given in the file are no longer required on the command line
        if action.dest in defaults:
            action.required = False
    return set(defaults) if given is None else {str(key).replace("-", "_") for key in given}
