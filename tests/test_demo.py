"""`llmeraser demo --model tiny`: the whole protocol on built-in MovieLens data, end to end."""

from __future__ import annotations

import json

from llmeraser_bench.demo import run_demo, tiny_demo_config


def test_tiny_demo_runs_and_the_erased_adapter_is_closer_to_retraining(tmp_path):
    lines: list[str] = []
    summary = run_demo(tiny_demo_config(), log=lines.append, out_dir=tmp_path)
    rows = {row["adapter"]: row for row in summary["rows"]}
    assert set(rows) == {"original", "erased", "erased_tr", "retrained"}
    assert set(summary["requests"]) == {"remove", "modify_query", "correct_response"}
    assert all(count >= 1 for count in summary["requests"].values())  # one mixed request file
    assert rows["retrained"]["kl_to_retrained"] == 0.0
    assert rows["erased"]["kl_to_retrained"] < rows["original"]["kl_to_retrained"]
    assert rows["erased_tr"]["kl_to_retrained"] < rows["original"]["kl_to_retrained"]
    assert summary["trust_region_report"]["trust_region"]["steps"][0]["accepted"]
    assert summary["auto_plan"]["choice"] in ("retrain", "update")
    assert any("would run" in line for line in lines)
    assert any("erase / retrain" in line for line in lines)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["rows"][1]["adapter"] == "erased"
