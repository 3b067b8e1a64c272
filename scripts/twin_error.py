"""Where the Exit River's error comes from, layer by layer, and how good the exit signal is
(issue 11: "which layers' twins add the most error, measured per layer; whether another exit
signal would do better").

    python scripts/twin_error.py qwen2.5-coder-0.5b docs/results/twin_error_qwen0.5b [--bits 4,3] [--tokens 1024]

On held-out Brown windows (the calibration text, disjoint from the eval's), one parallel
(teacher-forced) forward per setting, one intra-op thread:

1. one twin at a time: the dense model with only layer j's weights replaced by its twin, for
   every j: KL(dense || that model) and agreement, so the layers whose twins cost most stand out;
2. the static depths river@K for every K = 0..L (backbone layers 1..K, twins K+1..L): the cost
   of leaving after K, per position;
3. the exit signal: with dense's similarities s_l of each position, the River rule (first l > 1
   with s_l > tau) picks a depth per position. Its cost is read off (2) at that depth and compared
   with the fixed depth of the same mean, and with an oracle that knows (2) and spends the same
   mean depth where it lowers KL most (per position, min KL_K + lambda * K, swept over lambda):
   the best any per-token exit signal could do;
4. a signal read after the fact, "fall back when unsure": decode a token the cheap way (river@K,
   or the River rule), and if the top-1 probability of that token's own distribution is below p,
   run the skipped layers on the backbone and the head again (a fallback token reads the twins
   and the head twice). Priced in the bytes a token reads on the ggml path (the GGUF's own
   backbone and head blocks, the twins' int4 codes and scales), shown as the fixed depth that
   reads the same bytes, and compared with that fixed depth and the oracle there;
5. a per-layer tau profile (issue 11: "whether a per-layer tau profile would do better"): the
   same similarity, but a threshold of its own per layer, fitted by coordinate descent to
   minimise KL within a mean-depth budget, started from the best single tau. Fitted on half the windows
   and scored on the other half (two folds, every position scored out of fold), so a gain is
   not the fit memorising its own positions; the in-sample fit is shown beside it.

(3) is a proxy, said plainly: in (2) every position of a window leaves at the same K, so the
K/V a position reads from earlier tokens come from depth K, not from those tokens' own exits.
It ranks signals; the task scores in docs/results/study_* are the real measurement.

Writes twin_error.json, twin_error.md and twin_error.png under OUT."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import riverllm
from riverllm.bench.token_bytes import TokenBytes, ggml_token_bytes
from riverllm.calibrate import calibration_segments
from riverllm.errors import RiverError
from riverllm.files import write_atomic, write_text_atomic
from riverllm.fidelity import score_positions
from riverllm.policy import ExitPolicy

MIN_EXIT_LAYER = 1  # the library's default: exits are allowed after layer 2 on


@torch.no_grad()
def window_logits(lm, ids: list[int], policy: ExitPolicy, river=None, similarities: bool = False):
    """One parallel forward over a whole window: logits [tokens, vocab] (and s_l [tokens, L])."""
    engine = lm.engine
    cache = engine.new_cache(1, len(ids))
    output = engine.forward(torch.tensor([ids], device=engine.device), cache, policy, river, all_logits=True,
                            record_similarities=similarities)
    logits = output.logits[0].float()
    if similarities:
        return logits, torch.stack([s[0] for s in output.similarities], dim=1).float().cpu()
    return logits


def per_position(reference: torch.Tensor, logits: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(agrees, KL) at the scored positions: those that predict ids[start:]."""
    return score_positions(reference[start - 1:-1], logits[start - 1:-1])


def exit_depths(similarities: torch.Tensor, tau: float | torch.Tensor, num_layers: int) -> torch.Tensor:
    """Per position, the River rule's exit layer: the first l > MIN_EXIT_LAYER with s_l > tau
    (tau: one threshold, or a tensor of L, one per layer)."""
    if isinstance(tau, torch.Tensor):
        tau = tau[MIN_EXIT_LAYER:]
    allowed = similarities[:, MIN_EXIT_LAYER:] > tau  # column c is layer MIN_EXIT_LAYER + 1 + c
    first = torch.where(allowed.any(dim=1), allowed.float().argmax(dim=1) + MIN_EXIT_LAYER + 1,
                        torch.full((len(similarities),), num_layers))
    return first


def fallback_curves(kl: torch.Tensor, confidence: torch.Tensor, base: dict[str, torch.Tensor],
                    costs: TokenBytes) -> list[dict]:
    """Per base policy (name -> depth per position), per threshold p: positions whose top-1
    probability at their depth is below p fall back to dense (KL 0) and pay costs.fallback."""
    index = torch.arange(kl.shape[1])
    at_depth = torch.tensor([costs.at_depth(k) for k in range(kl.shape[0])], dtype=torch.float64)
    extra = torch.tensor([costs.fallback(k) for k in range(kl.shape[0])], dtype=torch.float64)
    curves = []
    for name, depth in base.items():
        for p in [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
            back = confidence[depth, index] < p
            num_bytes = float((at_depth[depth] + back * extra[depth]).mean())
            curves.append({"base": name, "p": p, "fallback_share": float(back.float().mean()),
                           "mean_depth": float(depth.float().mean()), "bytes": num_bytes,
                           "equivalent_depth": costs.equivalent_depth(num_bytes),
                           "bytes_vs_dense": num_bytes / costs.dense,
                           "kl": float(torch.where(back, 0.0, kl[depth, index]).mean())})
    return curves


PROFILE_GRID = [round(0.8 + 0.005 * i, 3) for i in range(40)] + [math.inf]  # inf: no exit after that layer


def fit_tau_profile(kl: torch.Tensor, similarities: torch.Tensor, num_layers: int, max_depth: float,
                    passes: int = 3) -> torch.Tensor:
    """Per-layer thresholds [L] with the least mean KL on these positions at a mean depth of at
    most max_depth: the best single tau of PROFILE_GRID that fits the budget first, then each
    layer's threshold in turn over the grid, keeping any change that lowers KL within the budget.
    (A budget, not a price per layer: KL against depth is not convex here, and a price jumps
    from one end of the depth range to the other.)"""
    index = torch.arange(kl.shape[1])

    def cost(taus: torch.Tensor) -> float:
        depth = exit_depths(similarities, taus, num_layers)
        return float(kl[depth, index].mean()) if depth.float().mean() <= max_depth else math.inf

    taus = min((torch.full((num_layers,), tau) for tau in PROFILE_GRID), key=cost)
    best = cost(taus)
    for _ in range(passes):
        for column in range(MIN_EXIT_LAYER, num_layers - 1):  # column c: exits after layer c + 1 < L
            for tau in PROFILE_GRID:
                trial = taus.clone()
                trial[column] = tau
                if (trial_cost := cost(trial)) < best:
                    taus, best = trial, trial_cost
    return taus


def profile_curve(kl: torch.Tensor, similarities: torch.Tensor, num_layers: int, folds: torch.Tensor,
                  budgets: list[float] | None = None) -> list[dict]:
    """Per depth budget: the fitted profile's (mean depth, KL) out of fold (fit on the other
    folds, score this one, for every fold; with one fold, in sample too) and in sample (fit and
    score on all positions)."""
    index = torch.arange(kl.shape[1])
    if budgets is None:
        budgets = [d for d in (3, 4, 6, 8, 10, 12, 14, 16, 20) if d < num_layers]
    fold_ids = folds.unique().tolist()
    curve = []
    for budget in budgets:
        depth = torch.empty(kl.shape[1], dtype=torch.long)
        for fold in fold_ids:
            scored = folds == fold
            fit = ~scored if len(fold_ids) > 1 else scored
            taus = fit_tau_profile(kl[:, fit], similarities[fit], num_layers, budget)
            depth[scored] = exit_depths(similarities[scored], taus, num_layers)
        taus = fit_tau_profile(kl, similarities, num_layers, budget)
        in_sample = exit_depths(similarities, taus, num_layers)
        curve.append({"budget": budget, "mean_depth": float(depth.float().mean()), "kl": float(kl[depth, index].mean()),
                      "in_sample_mean_depth": float(in_sample.float().mean()),
                      "in_sample_kl": float(kl[in_sample, index].mean()),
                      "taus": [None if math.isinf(t) else t for t in taus.tolist()]})
    return curve


def signal_curves(kl: torch.Tensor, similarities: torch.Tensor, num_layers: int,
                  folds: torch.Tensor | None = None) -> dict:
    """kl [L+1, P]: KL of river@K per position; similarities [P, L]; folds [P]: the fold (window
    group) of each position, for the cross-fitted tau profile (None: leave the profile out).
    Curves of (mean depth, mean KL) for the River rule over a tau grid, the fixed depths, the
    oracle and the per-layer tau profile."""
    positions = kl.shape[1]
    index = torch.arange(positions)
    river = []
    for tau in [0.8, 0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]:
        depth = exit_depths(similarities, tau, num_layers)
        river.append({"tau": tau, "mean_depth": float(depth.float().mean()), "kl": float(kl[depth, index].mean())})
    fixed = [{"depth": k, "kl": float(kl[k].mean())} for k in range(num_layers + 1)]
    oracle = []
    depths = torch.arange(num_layers + 1, dtype=torch.float32)[:, None]
    for lam in torch.logspace(-5, 1, 61).tolist():
        choice = (kl + lam * depths).argmin(dim=0)
        oracle.append({"lambda": lam, "mean_depth": float(choice.float().mean()), "kl": float(kl[choice, index].mean())})
    curves = {"river_rule": river, "fixed": fixed, "oracle": oracle}
    if folds is not None:
        curves["profile"] = profile_curve(kl, similarities, num_layers, folds)
    return curves


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation on (x, y) points sorted by x."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if x < points[0][0] else points[-1][1]


def measure_bits(lm, segments, bits: int, references, similarities, costs=None) -> dict:
    """`costs(river)` -> TokenBytes prices the fall-back signal (4. above); None leaves it out."""
    from tqdm.auto import tqdm

    engine, num_layers = lm.engine, lm.num_layers
    river = lm.river(bits)
    twins = engine.twins(river)
    swap = [{"layer": j + 1, "agree": 0, "kl": 0.0} for j in range(num_layers)]
    suffix_kl = [[] for _ in range(num_layers + 1)]
    suffix_agree = [0] * (num_layers + 1)
    suffix_confidence = [[] for _ in range(num_layers + 1)]
    positions = 0
    bar = tqdm(total=len(segments) * (2 * num_layers + 1), desc=f"{bits}-bit twins", leave=False)
    for segment, reference in zip(segments, references):
        start = segment.prompt_len
        positions += segment.positions
        for j in range(num_layers):
            saved = engine.backbone[j]
            engine.backbone[j] = twins[j]
            try:
                agrees, kl = per_position(reference, window_logits(lm, segment.ids, ExitPolicy()), start)
            finally:
                engine.backbone[j] = saved
            swap[j]["agree"] += int(agrees.sum())
            swap[j]["kl"] += float(kl.sum())
            bar.update()
        for k in range(num_layers + 1):
            if k == num_layers:
                logits = reference  # river@L is dense
            else:
                logits = window_logits(lm, segment.ids, ExitPolicy(force_exit_layer=k), river)
            agrees, kl = per_position(reference, logits, start)
            suffix_kl[k].append(kl)
            suffix_confidence[k].append(torch.softmax(logits[start - 1:-1], dim=-1).amax(dim=-1))
            suffix_agree[k] += int(agrees.sum())
            bar.update()
    bar.close()
    for row in swap:
        row["agree"] /= positions
        row["kl"] /= positions
    kl = torch.stack([torch.cat(rows) for rows in suffix_kl])  # [L+1, P]
    suffix = [{"depth": k, "agree": suffix_agree[k] / positions, "kl": float(kl[k].mean())}
              for k in range(num_layers + 1)]
    confidence = torch.stack([torch.cat(rows) for rows in suffix_confidence])
    # two folds of whole windows (even, odd) for the tau profile: neighbouring positions of one
    # window are alike, so a fold must not split a window
    folds = torch.cat([torch.full((segment.positions,), i % 2) for i, segment in enumerate(segments)])
    signal = signal_curves(kl, similarities, num_layers, folds)
    if costs is not None:
        base = {f"river@{k}": torch.full((kl.shape[1],), k) for k in (2, 4, 6, 8, 12)}
        base.update({f"river:{tau}": exit_depths(similarities, tau, num_layers) for tau in (0.9, 0.94)})
        signal["fallback"] = fallback_curves(kl, confidence, base, costs(river))
    return {"bits": bits, "positions": positions, "one_twin": swap, "static_depth": suffix, "signal": signal}


def report(result: dict) -> str:
    model, num_layers = result["model"], result["num_layers"]
    lines = [f"# Where the Exit River's error comes from: {model}", "",
             f"{result['positions']} teacher-forced positions of held-out Brown text ({result['windows']} windows of "
             f"{result['window']} tokens after {result['prefill']} of context), one parallel forward per setting, "
             f"one thread, {result['date']}, load average at the end {', '.join(f'{x:.1f}' for x in result['load_average'])}.",
             f"Command: `{result['command']}`. Method and caveats: the docstring of scripts/twin_error.py.", ""]
    for entry in result["bits"]:
        bits = entry["bits"]
        ranked = sorted(entry["one_twin"], key=lambda r: -r["kl"])
        total = sum(r["kl"] for r in entry["one_twin"])
        lines += [f"## {bits}-bit twins", "",
                  "One twin at a time (the dense model with layer j's weights replaced by its twin), the costliest first:", "",
                  "| layer | KL (nats) | share of the sum | agree |", "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['kl']:.4f} | {r['kl'] / total:.0%} | {r['agree']:.3f} |" for r in ranked]
        lines += ["", f"Sum over layers {total:.4f} nats; all twins at once (w{bits}) {entry['static_depth'][0]['kl']:.4f}.", "",
                  "Static depth river@K (backbone 1..K, twins after):", "", "| K | KL (nats) | agree |", "|---|---|---|"]
        lines += [f"| {r['depth']} | {r['kl']:.4f} | {r['agree']:.3f} |" for r in entry["static_depth"]]
        signal = entry["signal"]
        fixed = [(r["depth"], r["kl"]) for r in signal["fixed"]]
        oracle = [(r["mean_depth"], r["kl"]) for r in signal["oracle"]]
        lines += ["", "The exit signal (proxy, see above): the River rule's KL at its mean depth, against the fixed depth "
                  "and the oracle at the same mean depth:", "",
                  "| tau | mean depth | River rule KL | fixed depth KL | oracle KL |", "|---|---|---|---|---|"]
        for r in signal["river_rule"]:
            lines.append(f"| {r['tau']} | {r['mean_depth']:.2f} | {r['kl']:.4f} | {interpolate(fixed, r['mean_depth']):.4f} "
                         f"| {interpolate(oracle, r['mean_depth']):.4f} |")
        lines.append("")
        if "profile" in signal:
            lines += ["A per-layer tau profile (5. above), fitted per mean-depth budget; KL out of fold (fitted on the "
                      "other half of the windows) and in sample, against the single-tau River rule, the fixed depth and "
                      "the oracle at the out-of-fold mean depth:", "",
                      "| budget | mean depth | profile KL (out of fold) | in sample: depth, KL | River rule KL "
                      "| fixed depth KL | oracle KL |", "|---|---|---|---|---|---|---|"]
            river_rule = [(r["mean_depth"], r["kl"]) for r in signal["river_rule"]]
            for r in signal["profile"]:
                depth = r["mean_depth"]
                lines.append(f"| {r['budget']} | {depth:.2f} | {r['kl']:.4f} | {r['in_sample_mean_depth']:.2f}, "
                             f"{r['in_sample_kl']:.4f} | {interpolate(river_rule, depth):.4f} | "
                             f"{interpolate(fixed, depth):.4f} | {interpolate(oracle, depth):.4f} |")
            lines.append("")
        if "fallback" in signal:
            oracle_by_depth = oracle
            lines += ["Falling back when unsure (4. above): a token whose top-1 probability at its depth is below p "
                      "reruns the layers after its exit on the backbone and the head; cost = the fixed depth that reads "
                      "the same bytes per token (ggml path):", "",
                      "| base | p | falls back | bytes vs dense | cost (fixed depth) | KL | fixed depth KL | oracle KL |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in signal["fallback"]:
                depth = r["equivalent_depth"]
                lines.append(f"| {r['base']} | {r['p']} | {r['fallback_share']:.0%} | {r['bytes_vs_dense']:.2f} | {depth:.2f} | {r['kl']:.4f} "
                             f"| {interpolate(fixed, depth):.4f} | {interpolate(oracle_by_depth, depth):.4f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["bits"]
    figure, axes = plt.subplots(len(entries), 2, figsize=(11, 4 * len(entries)), squeeze=False)
    for row, entry in zip(axes, entries):
        layers = [r["layer"] for r in entry["one_twin"]]
        row[0].bar(layers, [r["kl"] for r in entry["one_twin"]])
        row[0].set(title=f"{entry['bits']}-bit: one twin at a time", xlabel="layer replaced by its twin",
                   ylabel="KL(dense || model), nats")
        signal = entry["signal"]
        row[1].plot([r["depth"] for r in signal["fixed"]], [r["kl"] for r in signal["fixed"]], "o-", label="fixed depth (river@K)")
        row[1].plot([r["mean_depth"] for r in signal["river_rule"]], [r["kl"] for r in signal["river_rule"]], "s-",
                    label="River rule (tau grid)")
        row[1].plot([r["mean_depth"] for r in signal["oracle"]], [r["kl"] for r in signal["oracle"]], "--", label="oracle")
        if "profile" in signal:
            row[1].plot([r["mean_depth"] for r in signal["profile"]], [r["kl"] for r in signal["profile"]], "^:",
                        label="per-layer tau profile (out of fold)")
        row[1].set(title=f"{entry['bits']}-bit: cost of leaving early (proxy)", xlabel="mean backbone depth",
                   ylabel="KL(dense || river), nats", yscale="log")
        row[1].legend()
    figure.suptitle(result["model"])
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def main() -> None:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="packaged name, model directory or .gguf file")
    parser.add_argument("out", type=Path, help="directory for twin_error.json / .md / .png")
    parser.add_argument("--bits", default="4,3", help="river bit widths, comma-separated")
    parser.add_argument("--tokens", type=int, default=1024, help="scored positions")
    parser.add_argument("--window", type=int, default=128, help="scored tokens per window")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the backbone's dtype (default: the engine's default on this device)")
    args = parser.parse_args()
    try:
        bits_list = [int(b) for b in args.bits.split(",")]
    except ValueError:
        parser.error(f"--bits takes comma-separated integers, got '{args.bits}'")
    model, out = args.model, args.out
    torch.set_num_threads(1)
    lm = riverllm.load(model, progress=False, dtype=getattr(torch, args.dtype) if args.dtype else None)
    segments, text = calibration_segments(lm, tokens=args.tokens, window=args.window)
    references, similarities = [], []
    for segment in tqdm(segments, desc="dense", leave=False):
        logits, sims = window_logits(lm, segment.ids, ExitPolicy(), similarities=True)
        references.append(logits)
        # the rule's view of each scored position: s_l of the token fed to predict it
        similarities.append(sims[segment.prompt_len - 1:-1])
    similarities = torch.cat(similarities)
    result = {"model": model, "num_layers": lm.num_layers, "text": text, "positions": len(similarities),
              "windows": len(segments), "window": args.window, "prefill": segments[0].prompt_len,
              "command": "python scripts/twin_error.py " + " ".join(sys.argv[1:]), "dtype": str(lm.engine.dtype),
              "bits": [measure_bits(lm, segments, bits, references, similarities, lambda river: ggml_token_bytes(lm.gguf_path, lm.num_layers, river))
                       for bits in bits_list]}
    result.update(threads=1, load_average=list(os.getloadavg()), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M"))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "twin_error.json", json.dumps(result, indent=2) + "\n")
    text = report(result)
    write_text_atomic(out / "twin_error.md", text)
    plot(result, out / "twin_error.png")
    print(text)


if __name__ == "__main__":
    try:
        main()
    except RiverError as error:
        sys.exit(f"error: {error}")
