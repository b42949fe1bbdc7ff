"""The command reference of ``docs/cli.md``: the ``--help`` of ``llmeraser`` and of every command, at a fixed
width (not the terminal's), between the markers ``BEGIN`` and ``END``; ``tests/test_docs.py`` checks that the
committed text is what the parser prints. Regenerate it with::

    python -m llmeraser.cli.reference --write docs/cli.md

(without ``--write``: print the section).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED: llmeraser --help -->"
END = "<!-- END GENERATED -->"
WIDTH = 100  # columns of the help text
REGENERATE = "python -m llmeraser.cli.reference --write docs/cli.md"


def reference_markdown(width: int = WIDTH) -> str:
    """The generated section, markers included: ``llmeraser --help``, then one subsection per command."""
    from llmeraser.cli import COMMANDS, build_parser
    from llmeraser.cli.flags import _subcommand

    parser = build_parser(width=width)
    lines = [BEGIN, f"<!-- written by `{REGENERATE}`: edit the parser, not this -->", "",
             "```text", parser.format_help().rstrip(), "```"]
    for command in COMMANDS:
        lines += ["", f"### `llmeraser {command.name}`", "", "```text",
                  _subcommand(parser, command.name).format_help().rstrip(), "```"]
    return "\n".join([*lines, END]) + "\n"


def with_reference(text: str, section: str) -> str:
    """``text`` (a Markdown file) with its section from ``BEGIN`` to ``END`` replaced by ``section``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} … {END} section to replace")
    return text[:start] + section.rstrip("\n") + text[end + len(END):]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmeraser.cli.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="MARKDOWN", default=None, help="replace the section in this file (docs/cli.md)")
    args = parser.parse_args(argv)
    section = reference_markdown()
    if args.write is None:
        sys.stdout.write(section)
        return 0
    path = Path(args.write)
    text = path.read_text(encoding="utf-8")
    updated = with_reference(text, section)
    if updated != text:
        from llmeraser.atomic import write_text_atomic

        write_text_atomic(path, updated)
        print(f"updated the command reference in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
