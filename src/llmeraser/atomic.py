"""Writing outputs atomically: a temporary beside the target, flushed to disk, then renamed into place.

Every file and directory llmeraser writes goes through here: ``atomic_file`` / ``write_text_atomic`` for
one file, ``atomic_directory`` for an adapter or cache directory. A reader sees the old state or the
complete new one, never a half-written file, also after a crash or a power cut (the data is fsync'ed
before the rename, the parent directory after it). On failure (an exception, Ctrl-C) the temporary is
removed; a full disk or quota becomes ``OutputSpaceError`` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from llmeraser.errors import InputError, OutputSpaceError, is_out_of_space


@contextlib.contextmanager
def atomic_file(path: str | Path, needed_bytes: int | None = None) -> Iterator[TextIO]:
    """Yield a text handle (UTF-8) on a temporary file beside ``path``; on success it is flushed to disk and
    renamed to ``path`` (replacing it), on failure removed. ``needed_bytes``: what the caller expects to
    write, for the out-of-space message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_out_of_space(err):
            raise OutputSpaceError.from_os_error(err, path, needed_bytes) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically: a temporary file beside ``path``, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_out_of_space(err):
            raise OutputSpaceError.from_os_error(err, path, len(text.encode("utf-8"))) from None
        raise


def _temporary_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary directories ``.NAME.tmp-HOST-PID`` beside ``out_dir`` left by killed runs on
    this host (their process is gone); returns those removed. Live writers and other hosts' are kept."""
    out_dir = Path(out_dir)
    prefix = f"{_temporary_prefix(out_dir)}{socket.gethostname()}-"
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    for candidate in out_dir.parent.iterdir():
        pid = candidate.name[len(prefix):] if candidate.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory itself to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_EXTRA_FILES: dict[Path, dict[str, str]] = {}


@contextlib.contextmanager
def extra_files(out_dir: str | Path, files: dict[str, str]) -> Iterator[None]:
    """While active, ``atomic_directory(out_dir)`` also writes these text files (name → content) into the
    directory before it is renamed into place: a caller's records (the CLI's ``run.toml``) are part of the
    same atomic write as the library's outputs."""
    key = Path(out_dir).absolute()
    _EXTRA_FILES[key] = files
    try:
        yield
    finally:
        _EXTRA_FILES.pop(key, None)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` to fill; on success it is flushed to disk and renamed
    to ``out_dir``, on failure (an exception, Ctrl-C) removed. Refuses an existing ``out_dir``; removes
    temporaries that killed runs left for the same target. A full disk or quota becomes ``OutputSpaceError``
    naming ``out_dir`` and ``needed_bytes`` (what the caller expects to write, where it knows)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InputError("output directory already exists (choose a new one; inputs are never overwritten)", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.with_name(f"{_temporary_prefix(out_dir)}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for name, text in _EXTRA_FILES.get(out_dir.absolute(), {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        fsync_tree(tmp)  # complete on disk before it gets its name
        os.replace(tmp, out_dir)
        fsync_directory(out_dir.parent)
    except Exception as err:  # OSError, or a Rust writer's error (safetensors) carrying the OS error code
        if not is_out_of_space(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # before measuring the free space
        raise OutputSpaceError.from_os_error(err, out_dir, needed_bytes) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
