"""The benchmark's outputs: bench.json (everything), bench.md (one table per target), bench.png."""

from __future__ import annotations

import json
from pathlib import Path

from riverllm.files import write_atomic

COLUMNS = [
    ("method", "method"),
    ("ms/token", "ms_per_token"),
    ("tok/s", "tokens_per_s"),
    ("x fastest dense", "ratio"),
    ("backbone layers/token", "mean_backbone_layers"),
    ("weights MB/token", "weight_bytes_per_token"),
    ("HBM bound ms", "hbm_bound_ms"),
    ("% of bound", "hbm_share"),
    ("peak MB", "peak_memory_bytes"),
    ("weights MB", "resident_weight_bytes"),
    ("prefill ms", "prefill_ms"),
]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("weight_bytes_per_token", "peak_memory_bytes", "resident_weight_bytes"):
        return f"{value / 1e6:.1f}" if value < 1e9 else f"{value / 1e6:.0f}"
    if key == "hbm_share":
        return f"{100 * value:.0f}%"
    if key == "ratio":
        return f"{value:.2f}x"
    if key == "tokens_per_s":
        return f"{value:.1f}"
    if key in ("ms_per_token", "hbm_bound_ms", "prefill_ms"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if key == "mean_backbone_layers":
        return f"{value:.2f}"
    return str(value)


def markdown(results: dict, command: str = "") -> str:
    env, settings = results["environment"], results["settings"]
    lines = [
        "# riverllm bench",
        "",
        f"- device: {env['device_name']} ({env['device']}), torch {env['torch']}, transformers {env['transformers']}",
        f"- batch 1, {settings['prompt_tokens']}-token prompt, {settings['new_tokens']} new tokens, "
        f"median of {settings['repeats']} repeat(s); prefill measured on a {settings['prefill_tokens']}-token prompt; "
        f"dtype {settings['dtype']}; CUDA graphs {'on' if settings['graphs'] else 'off'}; "
        f"river 4-bit HQQ, group {settings['group_size']}",
        f"- measured copy bandwidth: {results['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
        "(device-to-device copy, read + write)",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    for target in results["targets"]:
        lines += ["", f"## {target['target']} ({target['num_layers']} layers)", ""]
        info = target["info"]
        if "schedule_mean_exit" in info and info["schedule_mean_exit"] is not None:
            lines.append(f"exit profile: {Path(info['profile']).name} (recorded on a {info['profile_recorded_layers']}-layer "
                         f"model, mean exit {info['profile_mean_exit_recorded']:.2f}), scaled: mean "
                         f"{info['schedule_mean_exit']:.2f} backbone layers per token")
            lines.append("")
        lines.append("| " + " | ".join(title for title, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in target["methods"]:
            if row["status"] != "ok":
                lines.append(f"| {row['method']} | {row['status']} |" + " |" * (len(COLUMNS) - 2))
                continue
            lines.append("| " + " | ".join(_cell(key, row.get(key)) for _, key in COLUMNS) + " |")
        baseline = next((r["baseline"] for r in target["methods"] if r["status"] == "ok"), None)
        lines += ["", f"x fastest dense: against `{baseline}`, the fastest of hf-eager, hf-static-compile and dense."]
        for row in target["methods"]:
            if "decision_share" in row:
                lines.append(f"Exit decision cost ({row['method']}): {row['decision_ms_per_token']:.3f} ms/token, "
                             f"{100 * row['decision_share']:.1f}% of the step, "
                             f"{row['similarity_reads_per_token']:.2f} device-to-host reads per token.")
        for key, value in target["checks"].items():
            lines.append(f"Check {key}: {value}")
        if "river_build_s" in info:
            lines.append(f"River built in {info['river_build_s']:.1f} s; twin kernels: {', '.join(info['twin_backends'])}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    fig, axes = plt.subplots(len(targets), 1, figsize=(9, 1.2 + 0.45 * max(len(t["methods"]) for t in targets) * len(targets)),
                             squeeze=False)
    for ax, target in zip(axes[:, 0], targets):
        rows = [r for r in target["methods"] if r["status"] == "ok"]
        names = [r["method"] for r in rows]
        times = [r["ms_per_token"] for r in rows]
        colors = ["#999999" if r["engine"] == "transformers" else "#1f77b4" if "river" in r["method"] else "#ff7f0e"
                  for r in rows]
        positions = range(len(rows))
        ax.barh(positions, times, color=colors)
        ax.scatter([r["hbm_bound_ms"] for r in rows], positions, marker="|", s=200, color="black", label="HBM bound")
        for y, row in zip(positions, rows):
            ax.text(row["ms_per_token"], y, f" {row['ratio']:.2f}x", va="center", fontsize=7)
        ax.set_yticks(list(positions), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per token (batch 1); label: speed vs fastest dense")
        ax.set_title(f"{target['target']} ({target['num_layers']} layers)", fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path, command: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    results = {**results, "command": command}
    write_atomic(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
    write_atomic(paths["markdown"], lambda tmp: Path(tmp).write_text(markdown(results, command)))
    plot(results, paths["plot"])
    return paths
