"""docs/cli.md's command reference is what the parser prints (``llmeraser.cli.reference``)."""

from __future__ import annotations

from pathlib import Path

from llmeraser.cli.reference import BEGIN, END, REGENERATE, reference_markdown, with_reference

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_the_cli_reference_in_the_docs_is_the_parsers_help():
    text = CLI_DOC.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert with_reference(text, reference_markdown()) == text, (
        f"docs/cli.md's command reference differs from the parser's --help: regenerate it with `{REGENERATE}`")


def test_every_command_has_its_reference_section():
    from llmeraser.cli import COMMANDS

    section = reference_markdown()
    assert all(f"### `llmeraser {c.name}`" in section and f"usage: llmeraser {c.name} " in section for c in COMMANDS)
    assert max(len(line) for line in section.splitlines() if not line.startswith("<!--")) <= 100  # not the terminal's width
