"""Error types that carry enough context for a one-line, actionable message."""

from __future__ import annotations

import errno
from pathlib import Path


class LLMEraserError(Exception):
    """Base class of every error llmeraser raises on purpose."""


class InputError(LLMEraserError):
    """Bad user input: a data or request file, an id, a mismatched adapter.

    ``str(err)`` reads ``path:line: problem`` when a file and line are known.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class ConfigError(LLMEraserError, ValueError):
    """An option value out of its declared range or choices (a usage error).

    ``field`` names the option as its config dataclass spells it (``damping``, ``trust_region_steps``);
    ``str(err)`` is ``message`` where it names the field, else ``field message`` (``damping must be >= 0,
    got -1.0``). A ``ValueError`` too, so that callers catching ``ValueError`` keep working; the CLI shows
    the field as its flag (``--damping``).
    """

    def __init__(self, field: str, message: str):
        import re

        self.field = field
        self.message = message
        names_field = re.search(rf"(?<![\w-]){re.escape(field)}(?![\w-])", message) is not None
        super().__init__(message if names_field else f"{field} {message}")


class NumericalError(LLMEraserError):
    """A computation produced NaN/Inf, diverged, or met curvature it cannot handle.

    ``stage`` names where (``adapter``, ``losses``, ``gradients``, ``curvature``, ``solve``, ``update``);
    ``str(err)`` then reads ``stage 'solve': problem``.
    """

    def __init__(self, message: str, stage: str | None = None):
        self.message = message
        self.stage = stage
        super().__init__(f"stage '{stage}': {message}" if stage else message)


NO_SPACE_ERRNOS = frozenset(code for code in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if code)
"""``OSError.errno`` values of a full disk (ENOSPC) or an exhausted quota (EDQUOT)."""


def _no_space_errno(err: BaseException) -> int | None:
    """The ENOSPC / EDQUOT code of ``err``: an ``OSError``'s errno, or the ``(os error N)`` that Rust-backed
    writers (safetensors' ``SafetensorError``) put in their message; None for any other error."""
    if isinstance(err, OSError):
        return err.errno if err.errno in NO_SPACE_ERRNOS else None
    if not isinstance(err, Exception):
        return None
    text = str(err)
    return next((code for code in NO_SPACE_ERRNOS if f"(os error {code})" in text), None)


def is_out_of_space(err: BaseException) -> bool:
    """Whether ``err`` is a write failing on a full disk or an exhausted quota (see ``_no_space_errno``)."""
    return _no_space_errno(err) is not None


def _megabytes(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


class OutputSpaceError(LLMEraserError):
    """The output could not be written: no space left on the device (or the quota is exhausted).

    ``output`` names the directory or file being written, ``needed_bytes`` what it needs where known
    (at least), ``free_bytes`` what the file system had free when the write failed; nothing is left behind.
    """

    def __init__(self, output: str | Path, reason: str, needed_bytes: int | None = None, free_bytes: int | None = None):
        self.output = str(output)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        sizes = [f"it needs at least {_megabytes(needed_bytes)}" if needed_bytes is not None else None,
                 f"{_megabytes(free_bytes)} free there" if free_bytes is not None else None]
        known = "; ".join(s for s in sizes if s)
        super().__init__(
            f"{reason} while writing {self.output}" + (f" ({known})" if known else "")
            + "; nothing was written: free some space or write the output to another disk"
        )

    @classmethod
    def from_os_error(cls, err: BaseException, output: str | Path, needed_bytes: int | None = None) -> OutputSpaceError:
        """From the error of a failed write to ``output`` (a path whose parent exists; ``is_out_of_space(err)``)."""
        import shutil

        quota = _no_space_errno(err) == getattr(errno, "EDQUOT", None)
        reason = "disk quota exceeded" if quota else "no space left on device"
        try:
            free: int | None = shutil.disk_usage(Path(output).parent).free
        except OSError:
            free = None
        return cls(output, reason, needed_bytes, free)
