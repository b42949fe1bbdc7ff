"""The documentation has no dead references: every relative link and ``#anchor`` in README.md, docs/*.md and
benchmarks/README.md names a file that exists and, for an anchor, a heading of that file (GitHub's slug rule)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: inline markup dropped, lower case, punctuation other than ``-``
    and ``_`` removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated slugs get GitHub's ``-1``, ``-2`` suffixes."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link in the file's prose (not in code blocks or inline code)."""
    return [(number, m.group(1)) for number, line in prose_lines(path.read_text(encoding="utf-8"))
            for m in LINK.finditer(INLINE_CODE.sub(lambda code: " " * len(code.group()), line))]


def test_slug_follows_github():
    assert slug("How long will it take? `--dry-run`") == "how-long-will-it-take---dry-run"
    assert slug("Choosing between the update and a retrain: `--mode auto`") == \
        "choosing-between-the-update-and-a-retrain---mode-auto"
    assert slug("`erase_speed`: erase against retrain and the gradient floor") == \
        "erase_speed-erase-against-retrain-and-the-gradient-floor"
    assert slug("An adapter trained elsewhere (PEFT, TRL, the HF `Trainer`)") == \
        "an-adapter-trained-elsewhere-peft-trl-the-hf-trainer"


def test_every_document_has_links():
    assert len(DOCS) >= 9 and all(p.exists() for p in DOCS)
    assert links(ROOT / "README.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path):
    dead = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if not path.exists():
            dead.append(f"{where} (no such file)")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            dead.append(f"{where} (no heading with that anchor in {path.relative_to(ROOT)})")
    assert not dead, "dead references:\n" + "\n".join(dead)
