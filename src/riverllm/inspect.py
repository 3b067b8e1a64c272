"""Per-token, per-layer state transition similarity: what the exit rule sees (`riverllm inspect`)."""

from __future__ import annotations

from pathlib import Path

import torch

from riverllm.errors import RiverError
from riverllm.files import write_atomic
from riverllm.policy import ExitPolicy


@torch.no_grad()
def similarities(lm, ids: list[int]) -> list[list[float]]:
    """s_l of every token of `ids` at every layer [tokens, layers], from one pass through the full
    backbone (no exit)."""
    engine = lm.engine
    cache = engine.new_cache(1, len(ids))
    out = engine.forward(torch.tensor([ids], device=engine.device), cache, ExitPolicy(), record_similarities=True)
    return torch.stack([s[0] for s in out.similarities], dim=1).tolist()


def rule_exits(sims: list[list[float]], tau: float) -> list[int]:
    """The layer River's rule leaves at for each token's row of similarities (the last layer if none)."""
    rule = ExitPolicy(tau=tau)
    return [next((layer for layer, s in enumerate(row, 1) if rule.exits_after(layer, s)), len(row)) for row in sims]


def similarity_table(lm, prompt: str, raw: bool = False, tau: float | None = None) -> dict:
    """Run the prompt through the full backbone (no exit) and record s_l for every token and layer."""
    ids = lm.encode(prompt, raw)
    if len(ids) > lm.context_length:
        raise RiverError(f"the prompt has {len(ids)} tokens but the model's context window is {lm.context_length}: "
                         "shorten it")
    sims = similarities(lm, ids)
    threshold = lm.default_tau() if tau is None else tau
    tokens = [lm.tokenizer.decode([i]) for i in ids]
    return {"tokens": tokens, "token_ids": ids, "similarities": sims, "num_layers": lm.engine.num_layers,
            "tau": threshold, "exit_layers": rule_exits(sims, threshold)}


def write_heatmap(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = report["similarities"]
    height = min(2 + 0.18 * len(sims), 40)
    fig, ax = plt.subplots(figsize=(2 + 0.3 * report["num_layers"], height))
    image = ax.imshow(sims, aspect="auto", cmap="viridis", vmin=-1, vmax=1)
    ax.set_xlabel("layer l")
    ax.set_ylabel("token")
    ax.set_xticks(range(report["num_layers"]), [str(i) for i in range(1, report["num_layers"] + 1)], fontsize=7)
    if len(sims) <= 80:
        ax.set_yticks(range(len(sims)), [repr(t)[:16] for t in report["tokens"]], fontsize=6)
    ax.scatter([e - 1 for e in report["exit_layers"]], range(len(sims)), marker="|", color="red", s=40,
               label=f"exit (tau={report['tau']:g})")
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(image, ax=ax, label="cos(h_{l-1}, h_l)")
    ax.set_title("state transition similarity")
    fig.tight_layout()
    try:
        write_atomic(path, lambda temp: fig.savefig(temp, dpi=110, format="png"))
    finally:
        plt.close(fig)
