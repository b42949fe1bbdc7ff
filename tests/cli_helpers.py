"""Helpers for tests that drive the command line in-process (no interpreter start-up per command)."""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from conftest import one_thread

from llmeraser.cli import main

FAST_TRAIN = ["--lora-r", "2", "--target-modules", "q_proj", "v_proj", "--epochs", "3", "--lr", "1e-2",
              "--weight-decay", "0.1", "--max-length", "128"]


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*argv: str) -> Run:
    """``llmeraser ARGV`` in this process, single-threaded; exit code and captured stdout / stderr."""
    out, err = io.StringIO(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors
            code = int(exit_.code or 0)
    return Run(code, out.getvalue(), err.getvalue())


def digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (relative path → hex)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
