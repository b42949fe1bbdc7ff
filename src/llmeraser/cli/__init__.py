"""The ``llmeraser`` command: a thin shell over the library.

Subcommands: ``train``, ``erase``, ``retrain``, ``fit-curvature``, ``evaluate``, ``history``,
``apply-requests``, and the experiments' ``make-data``, ``bench``, ``demo``. Every option can also come from a
TOML file (``--config run.toml``: top-level keys, or a table named after the subcommand; keys spelled as
the flags, with ``-`` or ``_``); flags given on the command line override the file.

Exit codes: 0 success, 2 usage error, 3 bad input (files, ids, mismatched adapters), 4 numerical failure,
5 no space left for the output (disk full or quota exceeded), 130 interrupted (Ctrl-C). On 3, 4, 5 and 130
nothing is written. Only llmeraser's own errors (``llmeraser.errors``) get these codes: any other exception is
a bug, shown with its traceback (exit 1).

The modules: ``flags`` (the parser machinery: flags generated from the config dataclasses, a ``ConfigError``
shown with its flag), ``run_file`` (``run.toml`` and ``--config``), ``shared`` (what several commands do),
one module per group of commands (``train``, ``erase``, ``fit_curvature``, ``inspection``, ``experiments``),
``reference`` (every command's ``--help``: the reference section of ``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Collection, Sequence
from typing import Any

from llmeraser.cli.erase import ERASE
from llmeraser.cli.experiments import BENCH, DEMO, MAKE_DATA
from llmeraser.cli.fit_curvature import FIT_CURVATURE
from llmeraser.cli.flags import (
    _FLAGS,
    _as_flags,
    _check_declared,
    _config_message,
    _declared,
    _flag_names,
    _HelpFormatter,
    _spell,
    _subcommand,
)
from llmeraser.cli.inspection import APPLY_REQUESTS, EVALUATE, HISTORY
from llmeraser.cli.run_file import _config_defaults, _given_options, _preparse, _run_with_run_file
from llmeraser.cli.train import RETRAIN, TRAIN
from llmeraser.distributed import init_from_environment, shutdown
from llmeraser.errors import ConfigError, InputError, NumericalError, OutputSpaceError, is_out_of_space

__all__ = ["build_parser", "main"]

EXIT_USAGE, EXIT_INPUT, EXIT_NUMERICAL, EXIT_NO_SPACE = 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

COMMANDS = (TRAIN, ERASE, RETRAIN, FIT_CURVATURE, EVALUATE, HISTORY, APPLY_REQUESTS, MAKE_DATA, BENCH, DEMO)  # --help's order


def build_parser(commands: Collection[str] | None = None, *, width: int | None = None) -> argparse.ArgumentParser:
    """The ``llmeraser`` parser: every subcommand, with the flags of ``commands`` (default: all). ``main``
    adds those of the command it runs alone, so that a core command never builds the experiments' flags
    (generated from ``llmeraser_bench``'s configs). ``width``: of the help text (default: the terminal's)."""
    fmt: Any = functools.partial(_HelpFormatter, width=width) if width else _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="llmeraser", formatter_class=fmt,
        description="Unlearn training examples from a LoRA adapter by influence functions, without retraining.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, formatter_class=fmt,
                                    description=f"{command.help}. {command.details}" if command.details else command.help)
        sub.add_argument("--config", default=None, help="TOML file with default values for these options")
        if commands is None or command.name in commands:
            command.add_flags(sub)
        sub.set_defaults(run=command.run)
    for sub in subparsers.choices.values():  # the options help texts name as fields, spelled as the flags
        flags = _flag_names(sub)
        for action in sub._actions:
            if action.help:
                action.help = _as_flags(action.help, flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; llmeraser's own errors become a message and an exit code (2 usage, 3 input, 4
    numerical, 5 no space); any other exception is a bug and propagates with its traceback (exit 1)."""
    from llmeraser import lifecycle

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _preparse(argv).command
    parser = build_parser({command} if command else set())
    _FLAGS.clear()
    lifecycle.spell_options = _spell
    try:
        config_keys = _config_defaults(parser, argv)
        args = parser.parse_args(argv)
        sub = _subcommand(parser, args.command)
        _FLAGS.update(_flag_names(sub))
        args.argv, args.config_keys = argv, config_keys
        args.declared, args.given = _declared(sub), set(_given_options(args, sub))
        args.command_line = "llmeraser " + " ".join(shlex.quote(a) for a in argv)
        _check_declared(args, sub)
        init_from_environment()  # a no-op outside torchrun
        try:
            _run_with_run_file(args, sub)
        finally:
            shutdown()
    except ConfigError as err:  # an option value outside its declaration
        print(f"llmeraser: error: {_config_message(err, _FLAGS)}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as err:
        print(f"llmeraser: error: {_spell(str(err))}", file=sys.stderr)
        return EXIT_INPUT
    except NumericalError as err:
        print(f"llmeraser: numerical failure: {_spell(str(err))}", file=sys.stderr)
        return EXIT_NUMERICAL
    except OutputSpaceError as err:
        print(f"llmeraser: error: {err}", file=sys.stderr)
        return EXIT_NO_SPACE
    except OSError as err:  # a full disk in a write the library does not wrap
        if not is_out_of_space(err):
            raise
        print(f"llmeraser: error: {OutputSpaceError.from_os_error(err, err.filename or '(the output)')}", file=sys.stderr)
        return EXIT_NO_SPACE
    except KeyboardInterrupt:  # the writers remove their temporary files on the way out
        print("\nllmeraser: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        lifecycle.spell_options = None
    return 0

