"""Error types that carry enough context for a one-line, actionable message."""

from __future__ import annotations

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


class NumericalError(LLMEraserError):
    """A computation produced NaN/Inf, diverged, or met curvature it cannot handle.

    ``stage`` names where (``adapter``, ``losses``, ``gradients``, ``curvature``, ``solve``, ``update``);
    ``str(err)`` then reads ``stage 'solve': problem``.
    """

    def __init__(self, message: str, stage: str | None = None):
        self.message = message
        self.stage = stage
        super().__init__(f"stage '{stage}': {message}" if stage else message)
