"""Fidelity against dense (agree, kl, match) on the real SmolLM2-135M: exact for dense itself,
monotone in tau for the river, and reported by `riverllm eval`."""

from __future__ import annotations

import json

import pytest
import torch

from riverllm.calibrate import dense_pass
from riverllm.eval import metrics
from riverllm.eval.runner import EvalConfig, run_eval, summarize
from riverllm.eval.tasks import Perplexity, make_task
from riverllm.fidelity import Fidelity, References, Segment, measure, score_positions, stepwise_reference
from single_thread import one_thread  # noqa: F401  (autouse: one intra-op thread)

WINDOW, PREFILL = 40, 16


def eval_text_segments(lm, windows: int) -> list[Segment]:
    """The Brown windows `riverllm eval`'s ppl task reads (and measures fidelity on)."""
    task = Perplexity(windows * WINDOW, WINDOW, PREFILL)
    return [Segment(s.id, lm.encode(s.text, raw=True)[: PREFILL + WINDOW], PREFILL)
            for s in task.samples(None, 0, progress=False)]


def test_dense_against_itself_is_exact(smollm2):
    segment = eval_text_segments(smollm2, 1)[0]
    references = References(smollm2)
    dense = measure(smollm2, [segment], "dense", references)
    assert (dense.positions, dense.agree, dense.kl) == (WINDOW, 1.0, 0.0)
    assert dense.exit_layers == [30] * WINDOW and dense.full_precision_share == 1.0
    # The one-pass reference calibration uses on float32 models is the same up to rounding.
    _, one_pass = dense_pass(smollm2, segment)
    agrees, kl = score_positions(one_pass.logits(smollm2), references.get(segment).logits(smollm2))
    assert bool(agrees.all()) and float(kl.max()) < 1e-5


def test_score_positions_on_known_distributions():
    dense = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    method = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]))
    agrees, kl = score_positions(dense, method)
    assert agrees.tolist() == [False, True]
    expected = [0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5)),
                0.1 * torch.log(torch.tensor(0.5)) + 0.7 * torch.log(torch.tensor(0.7 / 0.6))]
    assert kl.tolist() == pytest.approx([float(e) for e in expected], abs=1e-6)
    tied = torch.tensor([[1.0, 1.0, 0.0]])  # a tie for the top token counts as agreement
    assert score_positions(torch.tensor([[0.0, 2.0, 1.0]]), tied)[0].tolist() == [True]


# Spread in exit depth on SmolLM2 (predicted mean exit layer on Brown text: about 2, 14, 28, 30),
# so each step changes the agreement by several points, far more than the 1-point tolerance.
TAUS = [0.5, 0.98, 0.99, 1.5]
AGREE_TOLERANCE = 0.01  # agree may not drop by more than this from one tau to the next


@pytest.fixture(scope="module")
def river_by_tau(smollm2) -> dict[float, Fidelity]:
    segments = eval_text_segments(smollm2, 3)
    references = References(smollm2)
    return {tau: measure(smollm2, segments, "river", references, tau=tau) for tau in TAUS}


def test_agree_and_kl_are_monotone_in_tau(river_by_tau):
    results = [river_by_tau[tau] for tau in TAUS]
    assert all(r.positions == 3 * WINDOW for r in results)
    for lower, higher in zip(results, results[1:]):
        assert higher.agree >= lower.agree - AGREE_TOLERANCE, [r.agree for r in results]
        assert higher.kl < lower.kl, [r.kl for r in results]
        assert higher.mean_exit_layer > lower.mean_exit_layer
    # Far ends: exiting at layer 2 everywhere is clearly worse than dense; never exiting is dense.
    assert results[0].agree < 0.9 and results[0].kl > 0.05
    assert (results[-1].agree, results[-1].kl, results[-1].mean_exit_layer) == (1.0, 0.0, 30.0)


def test_eval_reports_agree_kl_match_and_kernel(smollm2, tmp_path):
    assert "riverllm.eval.fidelity" in metrics.METRIC_MODULES  # the columns come through the eval's hook
    # Two windows measured as one batch of two (per-row exits: the same as one at a time, below).
    config = EvalConfig.parse("ppl,gsm8k", "dense,w4", tmp_path, limit=2, max_new_tokens="8",
                              ppl_tokens=48, ppl_window=24, progress=False, batch_size=2)
    summary = run_eval(smollm2, config)
    rows = {(r["task"], r["method"]): r for r in summary["results"]}
    for task in ("ppl", "gsm8k"):
        assert (rows[(task, "dense")]["agree"], rows[(task, "dense")]["kl"]) == (100.0, 0.0)
        assert rows[(task, "dense")]["kernel"] is None and rows[(task, "w4")]["kernel"] == "int4_cpu"
        assert 0 <= rows[(task, "w4")]["agree"] <= 100 and rows[(task, "w4")]["kl"] > 0
    assert rows[("gsm8k", "dense")]["match"] == 100.0

    # The ppl cell equals a direct measurement on the task's own windows, one window at a time.
    task = make_task("ppl", 48, 24)
    segments = [Segment(sample.id, smollm2.encode(sample.text, raw=True)[:16 + 24], 16)
                for sample in task.samples(2, 0, progress=False)]
    direct = measure(smollm2, segments, "w4", References(smollm2), batch_size=1)
    assert direct.positions == 48 and rows[("ppl", "w4")]["agree"] == pytest.approx(100 * direct.agree)
    assert rows[("ppl", "w4")]["kl"] == pytest.approx(direct.kl, rel=1e-5)

    columns = {c["key"]: c for c in summary["columns"]}
    assert columns["agree"]["panel"] and columns["kl"]["panel"] and not columns["kernel"]["panel"]
    assert "| agree % | KL | kernel |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["results"] == summary["results"]

    # Rebuilt from the files alone (no model), the cached measurements give the same cells.
    tasks = {name: make_task(name, 48, 24) for name in ("ppl", "gsm8k")}
    samples = {name: t.samples(2, 0, progress=False) for name, t in tasks.items()}
    rebuilt = summarize(tmp_path, tasks, ["dense", "w4"], samples, summary["settings"], lm=None)
    assert rebuilt["results"] == summary["results"]


def test_stepwise_reference_reproduces_teacher_forced_logits(smollm2):
    segment = eval_text_segments(smollm2, 1)[0]
    segment = Segment(segment.key, segment.ids[:PREFILL + 8], PREFILL)
    logits, _ = smollm2.teacher_forced(segment.ids, PREFILL, "dense")
    assert torch.equal(stepwise_reference(smollm2, segment).logits(smollm2), logits)


def test_twin_error_static_depths_match_teacher_forcing_and_restore_the_backbone(smollm2, script):
    """scripts/twin_error.py prices river@K with one parallel forward per window; for a static
    depth that is exactly what token-by-token teacher forcing measures (every position, the prompt
    included, leaves at K), so the two must agree. Its one-twin swaps must leave the backbone as
    they found it."""
    twin_error = script("twin_error")

    lm = smollm2
    ids = lm.encode("The river runs to the sea, and the sea does not fill; the wind goes south.", raw=True)[:20]
    segment = Segment("test/twin-error", ids, 6)
    backbone = list(lm.engine.backbone)
    reference, similarities = twin_error.window_logits(lm, ids, twin_error.ExitPolicy(), similarities=True)
    result = twin_error.measure_bits(lm, [segment], 4, [reference], similarities[segment.prompt_len - 1:-1])
    assert all(a is b for a, b in zip(lm.engine.backbone, backbone))
    assert len(result["one_twin"]) == lm.num_layers and all(r["kl"] > 0 for r in result["one_twin"])
    static = result["static_depth"]
    assert static[-1]["kl"] == 0 and static[-1]["agree"] == 1
    # A parallel forward and token-by-token steps round differently (the twins' int4 kernel runs
    # its activations in bfloat16, over other shapes), which moves the KL by up to a few percent
    # on this short text.
    references = References(lm)
    for depth in (0, 7, 20):
        measured = measure(lm, [segment], f"river@{depth}", references).kl
        assert static[depth]["kl"] == pytest.approx(measured, rel=5e-2)


def test_twin_error_prices_falling_back_when_unsure(script):
    from riverllm.bench.token_bytes import TokenBytes

    """The fall-back signal of scripts/twin_error.py: positions below the confidence threshold
    cost the backbone layers after their depth and a second head, and have no KL left."""
    twin_error = script("twin_error")
    costs = TokenBytes(backbone=[10, 10, 10], twins=[4, 4, 4], head=20)
    assert [costs.at_depth(k) for k in range(4)] == [32, 38, 44, 50] and costs.dense == 50
    assert costs.fallback(1) == 40 and costs.equivalent_depth(41) == 1.5 and costs.equivalent_depth(60) == 3
    assert costs.mixed(1) == 4 + 4 + 10 + 20 and costs.at_depths([0, 3]) == 41
    kl = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.5, 0.4, 0.3, 0.2], [0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    confidence = torch.tensor([[0.1] * 4, [0.2, 0.6, 0.9, 0.45], [0.5] * 4, [1.0] * 4])
    curves = twin_error.fallback_curves(kl, confidence, {"river@1": torch.full((4,), 1)}, costs)
    by_p = {r["p"]: r for r in curves}
    assert by_p[0.0]["fallback_share"] == 0 and by_p[0.0]["kl"] == pytest.approx(0.35) and by_p[0.0]["bytes"] == 38
    # p 0.5: positions 0 and 3 (0.2, 0.45) fall back; the others keep their KL
    assert by_p[0.5]["fallback_share"] == 0.5 and by_p[0.5]["kl"] == pytest.approx((0.4 + 0.3) / 4)
    assert by_p[0.5]["bytes"] == 38 + 40 / 2 and by_p[0.5]["bytes_vs_dense"] == pytest.approx(58 / 50)


def test_twin_error_fits_a_per_layer_tau_profile_out_of_fold(script):
    """The per-layer tau profile of scripts/twin_error.py: where one threshold cannot separate the
    positions that may leave after layer 2 from those that need layer 3, a threshold per layer
    does, and the cross-fitted curve scores each position with a profile fitted without it."""
    twin_error = script("twin_error")
    # 4 layers, 4 positions: 0 and 1 cost 1 nat if they leave after layer 2 and nothing after 3;
    # 2 and 3 cost nothing after 2. Layer 2's similarity ranks them rightly, layer 3's is lower.
    kl = torch.tensor([[2.0] * 4, [2.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    similarities = torch.tensor([[0.5, 0.932, 0.902, 0.99], [0.5, 0.932, 0.902, 0.99],
                                 [0.5, 0.968, 0.902, 0.99], [0.5, 0.968, 0.902, 0.99]])
    # one tau: either every position leaves after layer 2 (KL 0.5) or 0 and 1 run all 4 layers
    assert twin_error.exit_depths(similarities, 0.95, 4).tolist() == [4, 4, 2, 2]
    taus = twin_error.fit_tau_profile(kl, similarities, 4, max_depth=2.5)
    assert twin_error.exit_depths(similarities, taus, 4).tolist() == [3, 3, 2, 2]
    # a budget of 2 leaves no choice but to send everyone out after layer 2
    assert twin_error.exit_depths(similarities, twin_error.fit_tau_profile(kl, similarities, 4, 2), 4).tolist() == [2] * 4
    folds = torch.tensor([0, 1, 0, 1])
    curve = twin_error.profile_curve(kl, similarities, 4, folds, budgets=[2.5])
    assert curve[0]["mean_depth"] == 2.5 and curve[0]["kl"] == 0 and curve[0]["in_sample_mean_depth"] == 2.5
    # folds that put both costly positions on one side: the profile fitted on the cheap ones
    # sends the costly ones out after layer 2, and the out-of-fold KL says so
    curve = twin_error.profile_curve(kl, similarities, 4, torch.tensor([0, 0, 1, 1]), budgets=[2.5])
    assert curve[0]["kl"] == 0.5 and curve[0]["in_sample_kl"] == 0
    # one fold (a single window): nothing to hold out, so the out-of-fold columns are the in-sample fit
    curve = twin_error.profile_curve(kl, similarities, 4, torch.zeros(4, dtype=torch.long), budgets=[2.5])
    assert curve[0]["kl"] == curve[0]["in_sample_kl"] == 0 and curve[0]["mean_depth"] == 2.5
