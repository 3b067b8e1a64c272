"""The quality study's reading of a `riverllm eval` directory: paired differences with intervals.

    python scripts/study_report.py docs/results/study_qwen0.5b

`riverllm eval` writes per-sample records (samples/<task>/<method>.jsonl) and its own report.
This adds what a comparison on 100-164 problems needs: for every method, the paired difference to
dense, to the full low-bit model (w4 / w3) and, for a River setting, to the static-depth control
`river@K` with K the run's control nearest its mean exit layer (within one layer), each over the samples both have, with a 95% interval
(normal approximation of the mean of paired differences); River3's recovery of the w3-to-dense
gap; the speed of each method: a row's tok/s while the run decoded it in a batch (from the
records) and, where DIR/speed/bench.json holds a batch-1 timing slice (`riverllm bench --model M
--batch-sizes 1 --methods ...`, one thread), its batch-1 decode tok/s; and Pareto plots of score
against the share of layers at full precision and against batch-1 tok/s; where the run measured
teacher-forced fidelity (`--metrics agree,kl`, cached per sample under DIR/fidelity/), each method's
agreement with dense and KL against it, the paired KL difference to the same controls (per
window or sample, with a 95% interval), and a plot of KL against the share of layers at full
precision and against batch-1 tok/s. Writes study.md,
study.json and study_pareto.png into the directory; reads only finished records, so it can run
on a partial study.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from riverllm.eval.runner import records_path
from riverllm.files import write_atomic, write_text_atomic


def load(directory: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """{task: {method: {sample id: record}}} from the JSONL files."""
    records: dict[str, dict[str, dict[str, dict]]] = {}
    for path in sorted((directory / "samples").glob("*/*.jsonl")):
        by_id = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_id[record["id"]] = record
        if by_id:
            method = next(iter(by_id.values()))["method"]
            records.setdefault(path.parent.name, {})[method] = by_id
    return records


def load_fidelity(directory: Path, records: dict[str, dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict[str, dict]]]:
    """{task: {method: {sample id: {"positions", "agreeing", "kl_sum", "kl"}}}} from the per-sample fidelity
    cache `riverllm eval --metrics agree,kl` keeps under DIR/fidelity/ (riverllm/eval/fidelity.py)."""
    fidelity: dict[str, dict[str, dict[str, dict]]] = {}
    for task, methods in records.items():
        for method, recs in methods.items():
            path = directory / "fidelity" / records_path(Path(), task, method)
            if not path.exists():
                continue
            by_id = {}
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry["id"] in recs and entry["positions"] > 0:
                    by_id[entry["id"]] = {"positions": entry["positions"], "agreeing": entry["agreeing"],
                                          "kl_sum": entry["kl_sum"], "kl": entry["kl_sum"] / entry["positions"]}
            if by_id:
                fidelity.setdefault(task, {})[method] = by_id
    return fidelity


def mean_exit(records: dict[str, dict]) -> float:
    exits = [e for r in records.values() for e in r["exit_layers"][1:]] or [
        e for r in records.values() for e in r["exit_layers"]]
    return sum(exits) / max(len(exits), 1)


def paired(a: dict[str, dict], b: dict[str, dict], higher_is_better: bool, key: str = "score") -> dict | None:
    """Mean of a - b over shared samples (in score points: percent for accuracy), with a 95% CI."""
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    scale = 100.0 if higher_is_better else 1.0
    diffs = [scale * (a[i][key] - b[i][key]) for i in shared]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = 1.96 * sd / math.sqrt(len(diffs))
    return {"n": len(shared), "diff": mean, "low": mean - half, "high": mean + half}


def score(records: dict[str, dict], higher_is_better: bool) -> float:
    values = [r["score"] for r in records.values()]
    return (100.0 if higher_is_better else 1.0) * sum(values) / len(values)


def bits_of(method: str) -> int:
    match = re.match(r"^(?:river|w)(\d)?", method)
    return int(match.group(1)) if match and match.group(1) else 4


def batch1_speeds(directory: Path) -> tuple[dict[str, float], dict]:
    """{method: batch-1 decode tok/s} from a timing slice in DIR/speed/bench.json, and its environment."""
    path = directory / "speed" / "bench.json"
    if not path.exists():
        return {}, {}
    bench = json.loads(path.read_text())
    return ({r["method"]: r["tokens_per_s"] for r in bench["rows"] if r["batch_size"] == 1},
            bench.get("environment", {}))


def row_speed(records: dict[str, dict]) -> float | None:
    """A row's decode tok/s while it shared its batch's steps, over the method's records."""
    seconds = sum(r.get("decode_s", 0.0) for r in records.values())
    tokens = sum(r.get("decode_tokens", 0) for r in records.values())
    return tokens / seconds if seconds > 0 else None


def is_mixed(method: str) -> bool:
    """`w4-last8`: a static mix (the last K layers at full precision, twins before them)."""
    return re.match(r"^w\d+-last\d+$", method) is not None


def same_cost(prefix: str, depth: float, methods: dict) -> str:
    """The control `prefix`K of this run nearest the mean exit layer `depth`, within one layer
    (a tau's depth on the task is known only after the run, so the control run beforehand may sit
    a fraction of a layer off its rounded value); `prefix`round(depth) when none is that near."""
    ran = [int(m[len(prefix):]) for m in methods if m.startswith(prefix) and m[len(prefix):].isdigit()]
    near = [k for k in ran if abs(k - depth) <= 1.0]
    return f"{prefix}{min(near, key=lambda k: (abs(k - depth), k)) if near else round(depth)}"


def analyse(directory: Path) -> dict:
    records = load(directory)
    run = json.loads((directory / "run.json").read_text()) if (directory / "run.json").exists() else {}
    num_layers = run.get("num_layers", 0)
    speeds, speed_environment = batch1_speeds(directory)
    study = {"directory": str(directory), "model": run.get("model"), "num_layers": num_layers, "tasks": {},
             "speed_environment": speed_environment}
    fidelity = load_fidelity(directory, records)
    for task, methods in records.items():
        higher = task != "ppl"  # ppl's score is a per-token NLL: lower is better
        rows = {}
        for method, recs in methods.items():
            depth = mean_exit(recs)
            sizes = sorted({r.get("batch_size", 1) for r in recs.values()})
            row = {"n": len(recs), "score": score(recs, higher), "mean_exit_layer": depth,
                   "full_precision_share": depth / num_layers if num_layers else None,
                   "batch1_tok_s": speeds.get(method), "row_tok_s_batched": row_speed(recs), "batch_sizes": sizes}
            refs = {"dense": "dense", "wN": f"w{bits_of(method)}"}
            bits = bits_of(method)
            river = f"river{'' if bits == 4 else bits}"
            if (method.startswith("river") and ":" in method or is_mixed(method)) and num_layers:
                refs["static"] = same_cost(f"{river}@", depth, methods)  # a mix's exit_layers count its backbone layers
            if method.startswith("river") and num_layers:
                refs["mixed"] = same_cost(f"w{bits}-last", depth, methods)
            for label, ref in refs.items():
                if ref != method and ref in methods:
                    row[f"vs_{label}"] = {"method": ref, **(paired(recs, methods[ref], higher) or {})}
            measured = fidelity.get(task, {})
            if method in measured:
                entries = measured[method]
                positions = sum(e["positions"] for e in entries.values())
                row["fidelity"] = {"n": len(entries), "positions": positions,
                                   "agree": 100.0 * sum(e["agreeing"] for e in entries.values()) / positions,
                                   "kl": sum(e["kl_sum"] for e in entries.values()) / positions}
                for label, ref in refs.items():
                    if ref != method and ref in measured:
                        row["fidelity"][f"kl_vs_{label}"] = {
                            "method": ref, **(paired(entries, measured[ref], False, key="kl") or {})}
            if (method.startswith("river") or is_mixed(method)) and "dense" in methods and f"w{bits_of(method)}" in methods:
                full, low = score(methods["dense"], higher), score(methods[f"w{bits_of(method)}"], higher)
                if abs(full - low) > 1e-9:
                    row["gap_recovered"] = (row["score"] - low) / (full - low)
            rows[method] = row
        study["tasks"][task] = rows
    return study


def cell(value: dict | None) -> str:
    """A paired difference as a table cell: mean [95% interval] (control, n)."""
    if not value or "diff" not in value:
        return "-"
    return f"{value['diff']:+.2f} [{value['low']:+.2f}, {value['high']:+.2f}] ({value['method']}, n={value['n']})"


def kl_cell(value: dict | None) -> str:
    """The same for a KL difference, which needs more digits (the sample count is the table's)."""
    if not value or "diff" not in value:
        return "-"
    return f"{value['diff']:+.4f} [{value['low']:+.4f}, {value['high']:+.4f}] ({value['method']})"


def markdown(study: dict) -> str:
    lines = [f"# Quality study: {study['model']} ({study['num_layers']} layers)", "",
             "Scores: percent correct (humaneval pass@1, gsm8k), mean per-token NLL (ppl, lower is better). "
             "Differences are paired over the samples both methods finished, with a 95% interval; "
             "`static` is the run's river@K nearest the setting's mean exit layer, within one layer (for a mix "
             "wN-lastK: river@K, the same cost), `mixed` the static mix wN-lastK chosen the same way; `gap recovered` is "
             "(method - wN) / (dense - wN). Speed: `batch-1 tok/s` is the timing slice in speed/ (see below), "
             "`row tok/s @B` a row's decode speed while the run decoded it in batches of B (it shared each step "
             "with B-1 others: the run's throughput is about B times it).", ""]
    environment = study.get("speed_environment")
    if environment:
        lines += [f"Timing slice: torch {environment.get('torch')}, {environment.get('threads')} thread(s), "
                  f"{environment.get('machine')}, load average {environment.get('load_average')}, {environment.get('date')}.", ""]
    for task, rows in study["tasks"].items():
        lines += [f"## {task}", "", "| method | n | score | mean exit | full-precision share | batch-1 tok/s | "
                  "row tok/s @B | vs dense | vs wN | vs static | vs mixed | gap recovered |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        for method, row in sorted(rows.items(), key=lambda kv: kv[1]["mean_exit_layer"]):
            share, fast, batched = row["full_precision_share"], row.get("batch1_tok_s"), row.get("row_tok_s_batched")
            sizes = "/".join(map(str, row.get("batch_sizes", [])))
            lines.append(f"| {method} | {row['n']} | {row['score']:.2f} | {row['mean_exit_layer']:.2f} | "
                         f"{'-' if share is None else format(100 * share, '.0f') + '%'} | "
                         f"{'-' if fast is None else format(fast, '.2f')} | "
                         f"{'-' if batched is None else format(batched, '.2f') + ' @' + sizes} | {cell(row.get('vs_dense'))} | "
                         f"{cell(row.get('vs_wN'))} | {cell(row.get('vs_static'))} | {cell(row.get('vs_mixed'))} | "
                         f"{'-' if 'gap_recovered' not in row else format(row['gap_recovered'], '.2f')} |")
        lines.append("")
        measured = {m: r for m, r in rows.items() if "fidelity" in r}
        if measured:
            lines += [f"### {task}: fidelity against dense (teacher-forced)", "",
                      "KL(dense || method) in nats per position and greedy agreement, teacher-forced on "
                      + ("the Brown windows" if task == "ppl" else "each prompt plus dense's own answer")
                      + "; KL differences paired per window or sample (negative: closer to dense than the control).", "",
                      "| method | samples | positions | mean exit | agree % | KL | KL vs wN | KL vs static | KL vs mixed |",
                      "|---|---|---|---|---|---|---|---|---|"]

            for method, row in sorted(measured.items(), key=lambda kv: kv[1]["mean_exit_layer"]):
                fid = row["fidelity"]
                lines.append(f"| {method} | {fid['n']} | {fid['positions']} | {row['mean_exit_layer']:.2f} | "
                             f"{fid['agree']:.1f} | {fid['kl']:.4f} | {kl_cell(fid.get('kl_vs_wN'))} | "
                             f"{kl_cell(fid.get('kl_vs_static'))} | {kl_cell(fid.get('kl_vs_mixed'))} |")
            lines.append("")
    return "\n".join(lines)


PRIORS = ("recompute", "propagate", "mask", "monotonic")
AXES_X = {"full_precision_share": (100, "layers at full precision (%)"), "batch1_tok_s": (1, "batch-1 decode tok/s")}


def panels(study: dict) -> list[dict]:
    """The plot's panels, one row per (task, score or KL) and one column per x axis, each with
    its points (method, x, y); a panel with no point is left out (fidelity is measured on some
    tasks only, tok/s on the timing slice's methods only)."""
    found = []
    for task, rows in study["tasks"].items():
        for y in ("score", "kl"):
            for key, (scale, label) in AXES_X.items():
                points = []
                for method, row in rows.items():
                    value = row["score"] if y == "score" else row.get("fidelity", {}).get("kl")
                    if row.get(key) is not None and value is not None:
                        points.append((method, scale * row[key], value))
                if points:
                    found.append({"task": task, "y": y, "x": key, "xlabel": label, "points": points})
    return found


def y_range(points: list[tuple[str, float, float]]) -> tuple[float, float] | None:
    """Y limits that keep the study's methods readable when a prior strategy sits far off (the
    priors' NLL of 14 against River's 4.2 would flatten every other point into one line): the
    range of the non-prior points, padded; None when nothing lies more than five of their spans
    away. For unbounded values (NLL, KL); a percent score is readable on its own scale."""
    others = [y for method, _, y in points if not method.startswith(PRIORS)]
    if not others or len(others) == len(points):
        return None
    low, high = min(others), max(others)
    span = high - low or abs(high) or 1.0
    if all(low - 5 * span <= y <= high + 5 * span for _, _, y in points):
        return None
    return low - 0.1 * span, high + 0.1 * span


def plot(study: dict, path: Path) -> None:
    """Score and KL against the share of layers at full precision (left) and against batch-1
    tok/s (right, where a timing slice exists). Points far off the study's scale (the prior
    strategies' perplexity) are drawn at the panel's edge with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels(study)
    rows = [(p["task"], p["y"]) for p in found]
    rows = sorted(set(rows), key=rows.index)
    fig, axes = plt.subplots(max(len(rows), 1), len(AXES_X), figsize=(6 * len(AXES_X), 4 * max(len(rows), 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for panel in found:
        ax = axes[rows.index((panel["task"], panel["y"]))][list(AXES_X).index(panel["x"])]
        ax.set_visible(True)
        limits = y_range(panel["points"]) if panel["y"] == "kl" or panel["task"] == "ppl" else None
        off_scale = []
        for method, x, y in panel["points"]:
            marker = ("D" if is_mixed(method) else "o" if method.startswith("river") and "@" not in method
                      else "s" if "@" in method else "^")
            if limits is not None and not limits[0] <= y <= limits[1]:
                off_scale.append(f"{method} {y:.3g}")
                ax.scatter(x, min(max(y, limits[0]), limits[1]), marker="^" if y > limits[1] else "v", color="grey")
                continue
            ax.scatter(x, y, marker=marker)
            ax.annotate(method, (x, y), fontsize=6)
        if limits is not None:
            ax.set_ylim(*limits)
        task = panel["task"]
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel("KL against dense (nats per position)" if panel["y"] == "kl" else
                      "NLL per token (lower is better)" if task == "ppl" else "score (%)")
        title = f"{task}: fidelity" if panel["y"] == "kl" else task
        if off_scale:  # the priors, one grey arrow each at the edge, named here
            title += "\noff scale (grey): " + ", ".join(off_scale)
        ax.set_title(title, fontsize=8 if off_scale else None)
    fig.suptitle("o River (tau)   s fixed depth river@K   D static mix wN-lastK   ^ dense, wN, prior strategies",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    write_atomic(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    study = analyse(args.directory)
    write_text_atomic(args.directory / "study.json", json.dumps(study, indent=2) + "\n")
    write_text_atomic(args.directory / "study.md", markdown(study) + "\n")
    plot(study, args.directory / "study_pareto.png")
    print(markdown(study))


if __name__ == "__main__":
    main()
