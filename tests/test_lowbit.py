"""Low-bit rivers from the command line on the real SmolLM2-135M: `--bits 3` with river, w3 and
river3:TAU, token-exact against the library and against transformers' own generate."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from riverllm.river import QuantLinear
from single_thread import one_thread  # noqa: F401  (autouse: one intra-op thread)

PROMPT = "Name three rivers in Europe."
NEW_TOKENS = 6


def generate_json(monkeypatch, capsys, lm, *args: str) -> dict:
    """`riverllm generate ... --json` in this process, on the already loaded model."""
    from riverllm.cli import main

    monkeypatch.setattr("riverllm.cli.load_lm", lambda *a, **k: lm)
    monkeypatch.setattr(sys, "argv", ["riverllm", "generate", "--prompt", PROMPT, "-n", str(NEW_TOKENS), "--json", *args])
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_generate_bits3_river_in_a_real_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", "from riverllm.cli import main; main()", "generate", "--prompt",
                           PROMPT, "--bits", "3", "--method", "river", "-n", str(NEW_TOKENS), "--json"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["method"] == "river3"
    assert len(data["token_ids"]) == len(data["exit_layers"]) == NEW_TOKENS
    assert all(2 <= layer <= 30 for layer in data["exit_layers"])


def test_w3_is_the_all_3bit_model(monkeypatch, capsys, smollm2):
    data = generate_json(monkeypatch, capsys, smollm2, "--method", "w3")
    assert data["method"] == "w3" and data["exit_layers"] == [0] * NEW_TOKENS
    river = smollm2.river(3)
    linears = [m for m in river.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.bits == 3 and m.backend == "dequant" for m in linears)
    # transformers' own greedy generate on a copy whose decoder layers are the 3-bit twins.
    hybrid = copy.deepcopy(smollm2.model)
    for index in range(smollm2.num_layers):
        hybrid.model.layers[index] = river[index]
    ids = torch.tensor([smollm2.encode(PROMPT)])
    out = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert data["token_ids"] == out[0, ids.shape[1]:].tolist()


def test_river3_spellings_agree_and_never_exiting_is_dense(monkeypatch, capsys, smollm2):
    named = generate_json(monkeypatch, capsys, smollm2, "--method", "river3:0.95")
    flagged = generate_json(monkeypatch, capsys, smollm2, "--method", "river:0.95", "--bits", "3")
    assert named["method"] == flagged["method"] == "river3:0.95"
    assert named["token_ids"] == flagged["token_ids"] and named["exit_layers"] == flagged["exit_layers"]
    direct = smollm2.generate(PROMPT, method="river3:0.95", max_new_tokens=NEW_TOKENS)
    assert named["token_ids"] == direct.token_ids
    never = generate_json(monkeypatch, capsys, smollm2, "--method", "river3:1.5")
    dense = generate_json(monkeypatch, capsys, smollm2, "--method", "dense")
    assert never["token_ids"] == dense["token_ids"] and never["exit_layers"] == [30] * NEW_TOKENS


@pytest.mark.parametrize("args, words", [
    (["--bits", "5"], "--bits must be one of 2, 3, 4, 8"),
    (["--bits", "3", "--group-size", "48"], "--group-size must be one of"),
    (["--method", "w3", "--tau", "0.9"], "--tau only applies"),
    (["--method", "w"], "unknown method"),
    (["--method", "river5:0.9"], "--bits must be one of"),
])
def test_bad_low_bit_settings_are_one_line_errors(monkeypatch, capsys, smollm2, args, words):
    from riverllm.cli import main

    if "--bits" not in args:  # method errors come from the loaded model; bit widths fail before loading
        monkeypatch.setattr("riverllm.cli.load_lm", lambda *a, **k: smollm2)
    monkeypatch.setattr(sys, "argv", ["riverllm", "generate", "--prompt", PROMPT, "--json", "--model",
                                      "/no/such/model", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith("error: ") and words in lines[0], err
