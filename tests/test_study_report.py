"""scripts/study_report.py: the quality study's paired comparisons pick the right controls."""

from __future__ import annotations

import json

import pytest


def write_records(directory, method: str, scores: list[int], exit_layer: int) -> None:
    path = directory / "samples" / "gsm8k" / f"{method.replace(':', '_')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task": "gsm8k", "method": method, "id": f"s{i}", "score": score,
                         "exit_layers": [24] + [exit_layer] * 3, "decode_tokens": 3, "decode_s": 1.5, "batch_size": 8})
             for i, score in enumerate(scores)]
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

    # A setting whose tokens left a fraction of a layer off the control's depth meets the nearest
    # control within one layer, and none farther away.
    write_records(tmp_path, "river:0.93", [1, 0, 0, 0], 11)  # no river@11 ran
    write_records(tmp_path, "river@12", [0, 0, 0, 0], 12)
    write_records(tmp_path, "river@13", [1, 1, 1, 1], 13)
    rows = study_report.analyse(tmp_path)["tasks"]["gsm8k"]
    assert rows["river:0.93"]["vs_static"]["method"] == "river@12" and "vs_mixed" not in rows["river:0.93"]


def test_speeds_come_from_the_records_and_the_timing_slice(tmp_path, script):
    study_report = script("study_report")
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "num_layers": 24}))
    write_records(tmp_path, "dense", [1, 0], 24)
    write_records(tmp_path, "river:0.9", [1, 1], 4)
    (tmp_path / "speed").mkdir()
    (tmp_path / "speed" / "bench.json").write_text(json.dumps({"rows": [
        {"method": "river:0.9", "batch_size": 1, "tokens_per_s": 9.5},
        {"method": "river:0.9", "batch_size": 4, "tokens_per_s": 30.0}], "environment": {"threads": 1}}))
    study = study_report.analyse(tmp_path)
    rows = study["tasks"]["gsm8k"]
    assert rows["river:0.9"]["batch1_tok_s"] == 9.5 and rows["dense"]["batch1_tok_s"] is None
    assert rows["dense"]["row_tok_s_batched"] == pytest.approx(2.0) and rows["dense"]["batch_sizes"] == [8]
    text = study_report.markdown(study)
    assert "| 9.50 | 2.00 @8 |" in text and "1 thread(s)" in text
    study_report.plot(study, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def write_fidelity(directory, method: str, kls: list[float], agreeing: list[int], positions: int = 10) -> None:
    from pathlib import Path

    from riverllm.eval.runner import records_path

    path = directory / "fidelity" / records_path(Path(), "gsm8k", method)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"s{i}", "fingerprint": "f", "positions": positions, "agreeing": agree,
                         "kl_sum": kl * positions}) for i, (kl, agree) in enumerate(zip(kls, agreeing))]
    path.write_text("\n".join(lines) + "\n")


def test_fidelity_columns_read_the_evals_cache_and_pair_with_the_controls(tmp_path, script):
    study_report = script("study_report")
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "num_layers": 24}))
    write_records(tmp_path, "dense", [1, 1, 1], 24)
    write_records(tmp_path, "river:0.94", [1, 0, 1], 8)
    write_records(tmp_path, "river@8", [0, 0, 1], 8)
    write_records(tmp_path, "w4-last8", [1, 1, 0], 8)  # no fidelity measured: its column stays empty
    write_fidelity(tmp_path, "dense", [0.0, 0.0, 0.0], [10, 10, 10])
    write_fidelity(tmp_path, "river:0.94", [0.10, 0.20, 0.30], [9, 8, 7])
    write_fidelity(tmp_path, "river@8", [0.15, 0.30, 0.35], [8, 8, 6])
    study = study_report.analyse(tmp_path)
    rows = study["tasks"]["gsm8k"]
    river = rows["river:0.94"]["fidelity"]
    assert river["kl"] == pytest.approx(0.2) and river["agree"] == pytest.approx(80.0) and river["positions"] == 30
    assert river["kl_vs_static"]["method"] == "river@8"
    assert river["kl_vs_static"]["diff"] == pytest.approx(-(0.05 + 0.10 + 0.05) / 3)
    assert "fidelity" not in rows["w4-last8"] and "kl_vs_mixed" not in river
    text = study_report.markdown(study)
    assert "fidelity against dense" in text and "| river:0.94 | 3 | 30 | 8.00 | 80.0 | 0.2000 |" in text
    study_report.plot(study, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_the_plot_leaves_out_empty_panels_and_keeps_a_far_prior_off_the_scale(tmp_path, script):
    study_report = script("study_report")
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "num_layers": 24}))
    write_records(tmp_path, "dense", [1, 1, 1], 24)
    write_records(tmp_path, "river:0.94", [1, 0, 1], 8)
    write_records(tmp_path, "mask:0.94", [0, 0, 0], 8)
    write_fidelity(tmp_path, "dense", [0.0, 0.0, 0.0], [10, 10, 10])
    write_fidelity(tmp_path, "river:0.94", [0.05, 0.06, 0.07], [9, 8, 7])
    write_fidelity(tmp_path, "mask:0.94", [10.0, 11.0, 12.0], [0, 0, 1])
    study = study_report.analyse(tmp_path)
    found = study_report.panels(study)
    # no timing slice: only the share-of-layers panels, score and KL
    assert [(p["task"], p["y"], p["x"]) for p in found] == [("gsm8k", "score", "full_precision_share"),
                                                          ("gsm8k", "kl", "full_precision_share")]
    kl = found[1]
    low, high = study_report.y_range(kl["points"])
    assert low < 0.0 and 0.06 < high < 1.0  # dense's 0 and River's 0.06 readable, the prior's 11 clipped
    assert study_report.y_range([("river:0.94", 33.3, 0.06), ("river:0.9", 20.0, 0.07), ("mask:0.94", 33.3, 0.1)]) is None
    study_report.plot(study, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
