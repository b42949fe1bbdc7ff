"""llmeraser: influence-function unlearning for LoRA / PEFT fine-tuned language models.

The public API (imported on first use: ``import llmeraser`` stays light)::

    import llmeraser

    adapter = llmeraser.Adapter.load("adapters/original")
    train = llmeraser.read_examples("train.jsonl")
    erased = adapter.erase(train, [llmeraser.Remove("u17-3")])
    erased.save("adapters/erased")

Everything else (solvers, curvature operators, the trust region, benchmarks) lives in the submodules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": "llmeraser.lifecycle",
    "ErasedAdapter": "llmeraser.lifecycle",
    "ErasureReport": "llmeraser.lifecycle",
    "CurvatureCache": "llmeraser.curvature",
    "EraseConfig": "llmeraser.eraser",
    "CurvatureFitConfig": "llmeraser.curvature",
    "TrainConfig": "llmeraser.train",
    "LoraSettings": "llmeraser.adapter",
    "load_base_model": "llmeraser.models",
    "Example": "llmeraser.data",
    "TokenizationConfig": "llmeraser.data",
    "read_examples": "llmeraser.data",
    "examples_from_rows": "llmeraser.data",
    "Remove": "llmeraser.requests",
    "ModifyQuery": "llmeraser.requests",
    "CorrectResponse": "llmeraser.requests",
    "read_requests": "llmeraser.requests",
    "InputError": "llmeraser.errors",
    "NumericalError": "llmeraser.errors",
    "LlmeraserCallback": "llmeraser.integrations",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmeraser' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
