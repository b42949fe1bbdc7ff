"""Helpers for tests that drive the command line in-process (no interpreter start-up per command)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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


def erase_with_cache(root: Path, data: Path, method: str) -> None:
    """Remove ``ex2`` from ``root/adapter`` through the CLI with the cache at ``root/curv`` used directly
    (``root/erased``), and check that the report names the cache's ``method``."""
    requests = root / "requests.jsonl"
    requests.write_text('{"op": "remove", "id": "ex2"}\n')
    done = cli("erase", "--adapter", root / "adapter", "--data", data, "--requests", requests,
               "--out", root / "erased", "--curvature-cache", root / "curv", "--curvature-use", "direct")
    assert done.code == 0, done.err
    report = json.loads((root / "erased" / "erasure_report.json").read_text())
    assert report["curvature_cache_method"] == method and report["solver"]["curvature_cache"] == f"{method} direct"

