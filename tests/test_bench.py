"""`riverllm bench` on CPU with the tiny shape: its output files and its arithmetic (never speed)."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch

from conftest import tiny_model
from single_thread import one_thread  # noqa: F401  (one intra-op thread: steadier on a shared CPU)
from riverllm.bench.measure import ReplayedExits, WeightBytes
from riverllm.bench.shapes import DEFAULT_PROFILE, load_profile, scale_profile, shape_config
from riverllm.engine import RiverEngine, decode
from riverllm.errors import RiverError
from riverllm.river import QuantConfig, build_river

NEW_TOKENS = 4
CAP = 3  # --max-backbone-layers: the tiny shape has 6 layers
METHODS = ["hf-eager", "hf-static-compile", "dense", "river@2", "river@4", "river-profile", "river-profile+decide",
           f"river-profile-max{CAP}", "w4"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One real CLI run (`riverllm bench --device cpu --shapes tiny ...`), read back from its files."""
    from riverllm.cli import main

    out = tmp_path_factory.mktemp("bench")
    argv = ["riverllm", "bench", "--device", "cpu", "--shapes", "tiny", "--out", str(out), "--prompt-tokens", "6",
            "--new-tokens", str(NEW_TOKENS), "--prefill-tokens", "12", "--repeats", "1", "--copy-mib", "4",
            "--max-backbone-layers", str(CAP)]
    saved = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_info:  # click ends every command with sys.exit
            main()
    finally:
        sys.argv = saved
    assert exit_info.value.code in (0, None)
    return json.loads((out / "bench.json").read_text()), out


def ok_rows(results):
    return [row for row in results["targets"][0]["methods"] if row["status"] == "ok"]


def test_outputs_exist_with_every_method(bench):
    results, out = bench
    assert set(results) >= {"environment", "settings", "copy_bandwidth_bytes_per_s", "targets", "command"}
    assert results["command"].startswith("riverllm bench --device cpu")
    [target] = results["targets"]
    assert target["target"] == "tiny" and target["num_layers"] == 6
    assert [row["method"] for row in target["methods"]] == METHODS
    skipped = target["methods"][1]
    assert skipped["status"].startswith("skipped") and "CUDA" in skipped["status"]
    keys = {"ms_per_token", "tokens_per_s", "ratio", "baseline", "mean_backbone_layers", "weight_bytes_per_token",
            "hbm_bound_ms", "hbm_share", "peak_memory_bytes", "resident_weight_bytes", "prefill_ms", "samples_ms"}
    for row in ok_rows(results):
        assert keys <= set(row), row["method"]
        # (ms_per_token is a difference of two timings: with 4 tokens on a busy CPU it can even be
        # negative, so only the prefill, a timing itself, must be positive.)
        assert row["prefill_ms"] > 0 and row["prefill_tokens"] == 12
    markdown = (out / "bench.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in markdown
    assert "Exit decision cost (river-profile+decide)" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_ratios_are_fastest_dense_over_method(bench):
    results, _ = bench
    rows = ok_rows(results)
    dense = [r for r in rows if r["method"] in ("hf-eager", "hf-static-compile", "dense")]
    fastest = min(dense, key=lambda r: r["ms_per_token"])
    for row in rows:
        assert row["baseline"] == fastest["method"]
        assert row["ratio"] == pytest.approx(fastest["ms_per_token"] / row["ms_per_token"])
        assert row["tokens_per_s"] == pytest.approx(1000 / row["ms_per_token"])
        assert row["ms_per_token"] == pytest.approx(statistics.median(row["samples_ms"]))
    decided = next(r for r in rows if r["method"] == "river-profile+decide")
    plain = next(r for r in rows if r["method"] == "river-profile")
    assert decided["decision_ms_per_token"] == pytest.approx(decided["ms_per_token"] - plain["ms_per_token"])
    assert decided["decision_share"] == pytest.approx(decided["decision_ms_per_token"] / decided["ms_per_token"])


def hand_weight_bytes() -> tuple[int, int, int, int]:
    """(backbone layer, 4-bit twin, norm + head, embedding row) bytes of the tiny shape, by hand."""
    h, i, vocab, group = 128, 256, 512, 64
    kv = 2 * (h // 4)  # 2 KV heads of head_dim 32
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in) of q k v o gate up down
    norms = 2 * h * 4
    layer = sum(n * k for n, k in linears) * 4 + norms  # float32
    # Twin: two 4-bit codes per byte, plus a bf16 (scale, zero) pair per group of 64 inputs per output.
    twin = sum(n * k // 2 + (k // group) * n * 2 * 2 for n, k in linears) + norms
    head = vocab * h * 4 + h * 4
    return layer, twin, head, h * 4


def test_hbm_bound_arithmetic_matches_hand_computation(bench):
    results, _ = bench
    layer, twin, head, embed_row = hand_weight_bytes()
    weights = results["targets"][0]["weights"]
    assert weights == dict(backbone_layer_bytes=[layer] * 6, twin_layer_bytes=[twin] * 6, head_bytes=head,
                           embed_row_bytes=embed_row)
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    expected_exits = {"hf-eager": 6, "dense": 6, "river@2": 2, "river@4": 4, "w4": 0}
    for row in ok_rows(results):
        if row["method"] in expected_exits:
            k = expected_exits[row["method"]]
            assert row["weight_bytes_per_token"] == embed_row + k * layer + (6 - k) * twin + head
        mean_exit = row["mean_backbone_layers"]
        # Bytes are linear in the exit layer, so the mean over tokens is the bytes of the mean exit.
        assert row["weight_bytes_per_token"] == pytest.approx(embed_row + mean_exit * layer + (6 - mean_exit) * twin + head)
        assert row["hbm_bound_ms"] == pytest.approx(1000 * row["weight_bytes_per_token"] / bandwidth)
        assert row["hbm_share"] == pytest.approx(row["hbm_bound_ms"] / row["ms_per_token"])


def test_profile_rows_replay_the_scaled_profile(bench):
    results, _ = bench
    exits, recorded = load_profile(DEFAULT_PROFILE)
    scaled = scale_profile(exits, recorded, 6)
    decode_part = scaled[1:]
    steps = [decode_part[i % len(decode_part)] for i in range(NEW_TOKENS - 1)]
    rows = {row["method"]: row for row in ok_rows(results)}
    assert rows["river-profile"]["mean_backbone_layers"] == pytest.approx(sum(steps) / len(steps))
    assert rows["river-profile+decide"]["mean_backbone_layers"] == pytest.approx(sum(steps) / len(steps))
    capped = [min(e, CAP) for e in steps]
    assert rows[f"river-profile-max{CAP}"]["mean_backbone_layers"] == pytest.approx(sum(capped) / len(capped))
    assert rows["river-profile+decide"]["similarity_reads_per_token"] == pytest.approx(
        sum(e - 1 for e in steps) / len(steps))
    # Memory: w4 holds no backbone layer, the capped river only CAP of them; the norms of a freed
    # layer stay (its twin shares them), and each storage counts once.
    layer, norms = hand_weight_bytes()[0], 2 * 128 * 4
    resident = {name: row["resident_weight_bytes"] for name, row in rows.items()}
    river_only = resident["river-profile"] - resident["dense"]  # quantized codes and scales
    assert resident["river-profile"] - resident[f"river-profile-max{CAP}"] == (6 - CAP) * (layer - norms)
    assert resident["dense"] - resident["w4"] == 6 * (layer - norms) - river_only


def test_shipped_profile_is_a_generate_json_output():
    data = json.loads(DEFAULT_PROFILE.read_text())
    assert data["model"] == "smollm2-135m" and data["num_layers"] == 30 and data["method"] == "river:0.9"
    exits, layers = load_profile(DEFAULT_PROFILE)
    assert len(exits) == len(data["token_ids"]) and layers == 30


def test_scale_profile_keeps_relative_depth():
    assert scale_profile([30, 3, 2, 15, 29], 30, 16) == [16, 2, 2, 8, 15]
    assert scale_profile([30, 3, 2, 15, 29], 30, 32) == [32, 3, 2, 16, 31]
    assert scale_profile([0, 1], 30, 30) == [2, 2]  # no exit before layer 2


def test_shape_configs_are_the_public_ones():
    llama8b = shape_config("llama-3.1-8b")
    assert (llama8b.hidden_size, llama8b.num_hidden_layers, llama8b.intermediate_size, llama8b.num_key_value_heads,
            llama8b.vocab_size, llama8b.tie_word_embeddings) == (4096, 32, 14336, 8, 128256, False)
    assert llama8b.rope_parameters["rope_type"] == "llama3" and llama8b.rope_parameters["rope_theta"] == 500000.0
    qwen = shape_config("qwen2.5-1.5b")
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads,
            qwen.intermediate_size, qwen.vocab_size, qwen.tie_word_embeddings) == (1536, 28, 12, 2, 8960, 151936, True)
    llama1b = shape_config("llama-3.2-1b")
    assert (llama1b.hidden_size, llama1b.num_hidden_layers, llama1b.tie_word_embeddings) == (2048, 16, True)


def test_replayed_exits_with_and_without_reads_take_the_same_path():
    engine = RiverEngine(tiny_model("llama"))
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    schedule = (6, 2, 5, 3, 6, 0, 4)
    prompt = list(range(1, 9))
    runs = {}
    for read in (False, True):
        for graphs in (False, True):
            events = list(decode(engine, [prompt], ReplayedExits(exits=schedule, read_similarity=read), river,
                                 len(schedule), use_cuda_graphs=graphs))
            runs[read, graphs] = [e.tokens[0] for e in events], [e.exit_layers[0] for e in events]
    assert runs[False, False][1] == list(schedule)
    assert len(set(map(str, runs.values()))) == 1
    # With reads, the static path reads exactly layers 2..exit of each decoding step.
    assert engine._graph_runner.similarity_reads == sum(max(e - 1, 0) for e in schedule[1:])


def test_weight_bytes_count_shared_norms_and_quantized_codes():
    engine = RiverEngine(tiny_model("qwen2"))  # q/k/v biases
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    weights = WeightBytes.of(engine, river)
    layer = engine.layers[0]
    assert weights.backbone[0] == sum(p.numel() * p.element_size() for p in layer.parameters())
    codes = sum(m.packed.numel() * m.packed.element_size() + m.scales_and_zeros.numel() * 2
                for m in river[0].modules() if hasattr(m, "packed"))
    biases = sum(m.bias.numel() * 4 for m in river[0].modules() if hasattr(m, "packed") and m.bias is not None)
    norms = sum(p.numel() * 4 for n, p in layer.named_parameters() if "norm" in n)
    assert weights.twin[0] == codes + biases + norms
    assert weights.per_token(0) == weights.embed_row + sum(weights.twin) + weights.head


def test_bad_input_is_one_line_error(capsys):
    from riverllm.cli import main

    for argv, message in ((["--shapes", "llama-9b"], "unknown shape 'llama-9b'"),
                          (["--device", "cuda"] if not torch.cuda.is_available() else ["--new-tokens", "1"],
                           "--device cuda" if not torch.cuda.is_available() else "--new-tokens"),
                          (["--model", "smollm2-135m", "--shapes", "tiny"], "not both")):
        saved = sys.argv
        sys.argv = ["riverllm", "bench", *argv]
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            sys.argv = saved
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    with pytest.raises(RiverError, match="exit profile"):
        load_profile(DEFAULT_PROFILE.parent / "no-such-profile.json")


def test_time_per_token_is_the_n_token_run_minus_the_one_token_run(monkeypatch):
    """The timing formula on a fake clock: a run costs 50 ms + 10 ms per new token + 1 ms per
    prompt token, so every sample must be exactly 10 ms/token and the prefill 50 + 10 + 40 ms."""
    from riverllm.bench import run as bench_run

    calls: list[tuple[int, int]] = []

    def runner(prompt: list[int], new_tokens: int):
        calls.append((len(prompt), new_tokens))
        return bench_run.RunOutput([0] * new_tokens, [2] * new_tokens)

    def fake_time_call(fn, device) -> float:
        fn()
        prompt_length, new_tokens = calls[-1]
        return (50 + 10 * new_tokens + prompt_length) / 1000

    monkeypatch.setattr(bench_run, "time_call", fake_time_call)
    settings = bench_run.BenchSettings(device="cpu", new_tokens=9, prompt_tokens=5, prefill_tokens=40,
                                       repeats=3).resolved()
    timed = bench_run.time_method(runner, [[1] * 5, [2] * 7], [3] * 40, settings, torch.device("cpu"))
    assert timed.samples_ms == pytest.approx([10.0] * 6) and timed.ms_per_token == pytest.approx(10.0)
    assert timed.prefill_ms == pytest.approx(100.0)
    assert len(timed.exits) == 6 and timed.tokens == [[0] * 9, [0] * 9]
