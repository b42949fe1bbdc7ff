"""The model card (``README.md``) of an erased adapter: YAML front matter as PEFT writes it (``library_name:
peft``, ``base_model``, tags), then what produced the adapter: an erasure, its request counts by kind, the
method and the lineage head. Built from the erasure report's counts, settings and hashes only, so it holds
nothing of the removed or edited text (nor the requests' ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_CARD = "README.md"
TAGS = ("llmeraser", "unlearning", "machine-unlearning", "lora", "peft")
KIND_NAMES = {"remove": "removal", "modify_query": "query modification", "correct_response": "response correction"}


def lineage_head(lineage_text: str | None) -> str | None:
    """The ``entry_sha256`` of the last entry of ``lineage.jsonl`` content, or None."""
    lines = [line for line in (lineage_text or "").splitlines() if line.strip()]
    return json.loads(lines[-1]).get("entry_sha256") if lines else None


def base_model_of(adapter_dir: str | Path) -> str | None:
    """``base_model_name_or_path`` of the adapter's ``adapter_config.json``, or None."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def _counts(requests: dict[str, int]) -> str:
    parts = []
    for kind, name in KIND_NAMES.items():
        count = int(requests.get(kind, 0))
        parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return ", ".join(parts)


def _method(report: dict[str, Any]) -> str:
    if report.get("method") == "retrain":
        return "paired retrain: a fresh LoRA trained with the recorded recipe on the edited training set (exact)"
    config = report.get("config") or {}
    solver = (report.get("solver") or {}).get("solver", "?")
    text = f"influence-function update ({config.get('curvature', '?')} curvature, {solver} solver"
    if report.get("curvature_cache_method"):
        text += f", {report['curvature_cache_method']} curvature cache"
    if report.get("trust_region"):
        text += ", trust-region steps"
    return text + ")"


def _yaml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def erasure_model_card(report: dict[str, Any], base_model: str | None, lineage_head_sha256: str | None) -> str:
    """``README.md`` text of an adapter written by an erasure (see the module docstring)."""
    front = ["---", "library_name: peft"]
    if base_model:
        front.append(f"base_model: {_yaml_string(base_model)}")
    front += ["tags:", *(f"- {tag}" for tag in TAGS), "---"]
    requests = report.get("requests") or {}
    n_edited = sum(int(v) for v in requests.values())
    n_train, removed = report.get("n_train"), int(requests.get("remove", 0))
    lines = [
        *front,
        "",
        "# LoRA adapter produced by an erasure (llmeraser)",
        "",
        "This adapter was not trained directly: llmeraser produced it from an input adapter by an erasure, applying "
        f"{n_edited} deletion or correction request(s), so that it stands for the adapter trained on the edited "
        "training data. This card holds no text of the removed or edited examples.",
        "",
        f"- **Requests**: {_counts(requests)}",
        f"- **Method**: {_method(report)}",
    ]
    if isinstance(n_train, int):
        lines.append(f"- **Training examples**: {n_train} before, {n_train - removed} after")
    if base_model:
        lines.append(f"- **Base model**: `{base_model}`")
    if report.get("input_adapter_sha256"):
        lines.append(f"- **Input adapter** (sha256 of weights and config): `{report['input_adapter_sha256']}`")
    if lineage_head_sha256:
        lines.append(f"- **Lineage head** (`entry_sha256` of the last entry of `lineage.jsonl`): `{lineage_head_sha256}`")
    lines += [
        "",
        "`erasure_report.json` beside this card records the solver's diagnostics, the settings, the requests' "
        "ids and the hashes of every edited example; `lineage.jsonl` chains every train and erase step that led to this adapter "
        "(verify it with `llmeraser history <this directory>`).",
        "",
        "Load it as any PEFT adapter: `PeftModel.from_pretrained(base_model, \"<this directory>\")`.",
        "",
    ]
    return "\n".join(lines)
