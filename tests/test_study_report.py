"""scripts/study_report.py: the quality study's paired comparisons pick the right controls."""

from __future__ import annotations

import json

import pytest


def write_records(directory, method: str, scores: list[int], exit_layer: int) -> None:
    path = directory / "samples" / "gsm8k" / f"{method.replace(':', '_')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task": "gsm8k", "method": method, "id": f"s{i}", "score": score,
                         "exit_layers": [24] + [exit_layer] * 3}) for i, score in enumerate(scores)]
    path.write_text("\n".join(lines) + "\n")


def test_river_settings_and_static_mixes_meet_their_same_cost_controls(tmp_path, script):
    study_report = script("study_report")
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "num_layers": 24}))
    write_records(tmp_path, "dense", [1, 1, 1, 1], 24)
    write_records(tmp_path, "w4", [0, 0, 0, 1], 0)
    write_records(tmp_path, "river:0.94", [1, 0, 0, 1], 8)
    write_records(tmp_path, "river@8", [0, 0, 0, 1], 8)
    write_records(tmp_path, "w4-last8", [1, 1, 0, 1], 8)  # a mix's exit layers count its backbone layers
    rows = study_report.analyse(tmp_path)["tasks"]["gsm8k"]
    river = rows["river:0.94"]
    assert river["vs_static"]["method"] == "river@8" and river["vs_static"]["diff"] == pytest.approx(25.0)
    assert river["vs_mixed"]["method"] == "w4-last8" and river["vs_mixed"]["diff"] == pytest.approx(-25.0)
    mixed = rows["w4-last8"]
    assert mixed["vs_static"]["method"] == "river@8" and mixed["vs_wN"]["method"] == "w4"
    assert mixed["gap_recovered"] == pytest.approx((75 - 25) / (100 - 25))
    assert mixed["full_precision_share"] == pytest.approx(8 / 24)
    assert "vs_mixed" in river and "| w4-last8 |" in study_report.markdown(study_report.analyse(tmp_path))
