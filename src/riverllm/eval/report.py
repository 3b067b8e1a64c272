"""From per-sample records to the run's summary: summary.json, report.md, pareto.png, exits.png.

One row per (task, method):

* score: the task's metric (pass@1 % for humaneval, accuracy % for gsm8k and asdiv,
  perplexity for ppl: lower is better);
* tokens/s: generated tokens after the first over their decoding time (the first token pays for
  the prefill); for ppl, teacher-forced tokens over the whole call;
* speedup: tokens/s over dense's tokens/s on the same task (when dense is in the sweep);
* layers/token: backbone layers run per token (dense: all L; w4: 0);
* exited %: share of tokens that left the backbone before its last layer;

plus one column per metric provider (metrics.py). Every file is written to a temporary file
in the same directory and renamed into place, so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from riverllm.eval.metrics import MetricProvider
from riverllm.files import write_atomic, write_text_atomic

RowKey = tuple[str, str]

# (key, header, decimals) of the standard columns after task / method / metric.
STANDARD_COLUMNS = [
    ("score", "score", None),  # decimals per task: see _format_score
    ("n", "n", 0),
    ("tokens_per_s", "tok/s", 1),
    ("speedup", "speedup", 2),
    ("mean_layers", "layers/token", 2),
    ("exited_share", "exited %", 1),
]


def method_family(method: str) -> tuple[str, str]:
    """("river", "0.9") for "river:0.9": methods of one family form one curve in pareto.png."""
    family, _, param = method.partition(":")
    return family, param


def summary_row(task_name: str, metric: str, method: str, records: list[dict], score: float | None,
                num_layers: int) -> dict[str, Any]:
    exits = [layer for record in records for layer in record.get("exit_layers", [])]
    decode_tokens = sum(record["decode_tokens"] for record in records)
    decode_s = sum(record["decode_s"] for record in records)
    family, param = method_family(method)
    return {
        "task": task_name, "method": method, "family": family, "param": param, "metric": metric,
        "score": score, "n": len(records), "tokens": sum(record["tokens"] for record in records),
        "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None, "speedup": None,
        "mean_layers": sum(exits) / len(exits) if exits else None,
        "exited_share": 100.0 * sum(layer < num_layers for layer in exits) / len(exits) if exits else None,
        "time_s": sum(record.get("time_s", 0.0) for record in records),
    }


def add_speedups(rows: dict[RowKey, dict[str, Any]]) -> None:
    for (task, _), row in rows.items():
        dense = rows.get((task, "dense"))
        if dense and dense["tokens_per_s"] and row["tokens_per_s"]:
            row["speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]


def exit_histogram(records: list[dict], num_layers: int) -> list[int]:
    """Tokens per exit layer 0..L (L: ran the whole backbone)."""
    counts = [0] * (num_layers + 1)
    for record in records:
        for layer in record.get("exit_layers", []):
            counts[min(max(layer, 0), num_layers)] += 1
    return counts


# --- report.md ----------------------------------------------------------------------------------


def _format(value: Any, decimals: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):  # a text column (issue 6: the fidelity module's `kernel`)
        return value
    if isinstance(value, int) and decimals == 0:
        return str(value)
    return f"{value:.{decimals}f}"


def _format_score(row: dict) -> str:
    return _format(row["score"], 2 if row["metric"] == "perplexity" else 1)


def markdown_table(summary: dict) -> str:
    columns = summary["columns"]
    header = ["task", "method", "metric"] + [column["label"] for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(columns)]
    for row in summary["results"]:
        cells = [row["task"], row["method"], row["metric"]]
        for column in columns:
            if column["key"] == "score":
                cells.append(_format_score(row))
            elif column["key"] == "speedup":
                cells.append("–" if row["speedup"] is None else f"{row['speedup']:.2f}x")
            else:
                cells.append(_format(row.get(column["key"]), column["digits"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(summary: dict) -> str:
    settings = summary["settings"]
    task_notes = ", ".join(f"{t['name']} ({t['metric']}, {'higher' if t['higher_is_better'] else 'lower'} is better)"
                           for t in summary["tasks"])
    extra = [c for c in summary["columns"] if c["key"] not in {key for key, _, _ in STANDARD_COLUMNS}]
    lines = [
        f"# riverllm eval: {settings['model']}",
        "",
        f"{summary['num_layers']} decoder layers; river {settings['bits']}-bit HQQ, group size "
        f"{settings['group_size']}; device {settings.get('device', '?')}; batch 1, greedy decoding.",
        f"Tasks: {task_notes}.",
        "",
        markdown_table(summary),
        "",
        "Columns: **score** is the task's metric; **n** the samples scored; **tok/s** generated tokens "
        "after the first over their decoding time (ppl: teacher-forced tokens over the whole call, "
        "its short prefill included); **speedup** tok/s over dense's on the same task; "
        "**layers/token** backbone layers run per token (dense runs all, w4 none); **exited %** the "
        "share of tokens that left the backbone before its last layer.",
    ]
    for column in extra:
        lines += ["", f"**{column['label']}**: {column.get('description') or column['key']}."]
    lines += [
        "",
        "Packaged models are GGUF checkpoints that transformers dequantizes when loading, so their "
        "\"dense\" (full-precision) numbers carry the GGUF's own rounding.",
        "",
        "![accuracy vs speedup](pareto.png)",
        "",
        "![exit layers](exits.png)",
        "",
    ]
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------


def _save_figure(figure, path: Path) -> None:
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def pareto_figure(summary: dict, path: Path) -> None:
    """Score (and each provider's value) against speedup: one panel per task and metric, one
    curve per method family across its sweep (river at tau 0.8, 0.9, 0.95 ...)."""
    from matplotlib.figure import Figure

    tasks = [task["name"] for task in summary["tasks"]]
    panels = [{"key": "score", "label": None, "higher_is_better": None}]
    panels += [c for c in summary["columns"] if c.get("panel")]
    has_speedup = any(row["speedup"] is not None for row in summary["results"])
    x_key = "speedup" if has_speedup else "tokens_per_s"
    families = list(dict.fromkeys(row["family"] for row in summary["results"]))
    colors = {family: f"C{index % 10}" for index, family in enumerate(families)}
    figure = Figure(figsize=(4.2 * len(tasks), 3.4 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), len(tasks), squeeze=False)
    for panel_index, panel in enumerate(panels):
        for task_index, task in enumerate(tasks):
            ax = axes[panel_index][task_index]
            task_info = summary["tasks"][task_index]
            label = panel["label"] or task_info["metric"]
            better = task_info["higher_is_better"] if panel["key"] == "score" else panel["higher_is_better"]
            for family in families:
                points = sorted((row[x_key], row[panel["key"]], row["param"]) for row in summary["results"]
                                if row["task"] == task and row["family"] == family
                                and row[x_key] is not None and row.get(panel["key"]) is not None)
                if not points:
                    continue
                xs, ys, params = zip(*points)
                ax.plot(xs, ys, marker="o", color=colors[family], label=family)
                for x, y, param in points:
                    if param:
                        ax.annotate(param, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if panel["key"] == "score" and task_info["metric"] == "perplexity":
                ax.set_yscale("log")  # methods that lose the thread reach perplexities in the millions
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.set_xlabel("speedup vs dense" if has_speedup else "tokens/s")
            ax.set_ylabel(f"{label} ({'higher' if better else 'lower'} is better)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured for this task", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle(f"{summary['settings']['model']}: quality vs speed")
    _save_figure(figure, path)


def exits_figure(summary: dict, path: Path) -> None:
    """Share of tokens per exit layer, one panel per task, one line per early-exit method.
    dense (all at L) and wN (all at 0) are left out unless nothing else was run."""
    from matplotlib.figure import Figure

    tasks = [task["name"] for task in summary["tasks"]]
    num_layers = summary["num_layers"]
    figure = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        histograms = summary["exit_histograms"].get(task, {})
        shown = {m: h for m, h in histograms.items() if m != "dense" and not method_family(m)[0].startswith("w")}
        for index, (method, counts) in enumerate((shown or histograms).items()):
            total = sum(counts)
            if total:
                # Methods that share an exit rule share a histogram: dashes keep every line visible.
                ax.step(range(num_layers + 1), [c / total for c in counts], where="mid", label=method,
                        color=f"C{index % 10}", linestyle=("-", "--", ":", "-.")[index % 4])
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(f"backbone layers run (of {num_layers})")
        ax.set_ylabel("share of tokens")
        ax.set_xlim(-0.5, num_layers + 0.5)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    figure.suptitle(f"{summary['settings']['model']}: where tokens exit")
    _save_figure(figure, path)


# --- the whole summary --------------------------------------------------------------------------


def columns(providers: list[MetricProvider]) -> list[dict]:
    standard = [{"key": key, "label": label, "digits": digits, "higher_is_better": None, "panel": False}
                for key, label, digits in STANDARD_COLUMNS]
    extra = [{"key": p.name, "label": p.label, "digits": p.digits, "higher_is_better": p.higher_is_better,
              "panel": p.panel, "description": p.description}
             for p in providers]
    return standard + extra


def write_outputs(out_dir: Path, summary: dict) -> None:
    """summary.json, report.md, pareto.png and exits.png in `out_dir`."""
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / "report.md", markdown_report(summary))
    pareto_figure(summary, out_dir / "pareto.png")
    exits_figure(summary, out_dir / "exits.png")
