"""Tokens of River under vLLM against vLLM dense and riverllm's own engine, on one model.

    python scripts/vllm_tokens_check.py --model qwen2.5-coder-0.5b --out docs/results/vllm_plugin

In the vLLM environment. The same 8 chat prompts (scripts/load_test.py's), as token ids, in one
batch, greedy, float32, --max-tokens each: vLLM dense, River at tau 2 (never exits) and at --tau,
and riverllm's engine (dense and river:TAU) on the same converted directory. Writes
tokens_<model>.json / .md; tests/test_vllm_engine.py asserts the same equalities on SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import PROMPTS, machine, uptime, write_atomically  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/results/vllm_plugin"))
    args = parser.parse_args()
    import riverllm
    from riverllm.vllm_plugin.offline import run_in_subprocess
    from riverllm.vllm_plugin.serve import model_directory

    report = {"command": "python " + shlex.join(sys.argv), "machine": machine(), "uptime_before": uptime()}
    model_dir = model_directory(args.model, progress=False)
    lm = riverllm.load(str(model_dir), progress=False)
    ids = [lm.encode(prompt) for prompt in PROMPTS]
    own = {method: [r.token_ids for r in lm.generate_batch(PROMPTS, method=method, max_new_tokens=args.max_tokens)]
           for method in ("dense", f"river:{args.tau}")}
    del lm
    with tempfile.TemporaryDirectory() as workdir:
        vllm = {name: run_in_subprocess(model_dir, ids, tau, args.max_tokens, Path(workdir))
                for name, tau in (("dense", None), ("river-tau2", 2.0), (f"river:{args.tau}", args.tau))}

    def same(a: list[list[int]], b: list[list[int]]) -> str:
        return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"

    river = vllm[f"river:{args.tau}"]
    rows = [("vLLM dense = riverllm dense", same(vllm["dense"]["tokens"], own["dense"])),
            ("vLLM River tau 2 = vLLM dense", same(vllm["river-tau2"]["tokens"], vllm["dense"]["tokens"])),
            (f"vLLM River tau {args.tau} = riverllm river:{args.tau}", same(river["tokens"], own[f"river:{args.tau}"])),
            (f"vLLM River tau {args.tau} = vLLM dense", same(river["tokens"], vllm["dense"]["tokens"]))]
    report.update(model=args.model, tau=args.tau, max_tokens=args.max_tokens, comparisons=dict(rows),
                  river_stats={name: run["stats"] for name, run in vllm.items()}, riverllm=own,
                  vllm={name: run["tokens"] for name, run in vllm.items()}, uptime_after=uptime())
    stats = river["stats"]
    lines = [f"# River under vLLM, tokens: `{args.model}`", "", f"Command: `{report['command']}`", "",
             f"{len(PROMPTS)} chat prompts in one batch, greedy, float32, {args.max_tokens} tokens at most (EOS ends a "
             f"prompt). `uptime`: `{report['uptime_before']}`.", "", "| comparison | prompts token-identical |",
             "|---|---|", *[f"| {name} | {value} |" for name, value in rows], "",
             f"River at tau {args.tau} under vLLM: mean exit layer {stats['decode_mean_exit_layer']:.2f} of "
             f"{stats['num_layers']} over {stats['decode_tokens']} decoding tokens (prompts: "
             f"{stats['prefill_mean_exit_layer']:.2f}); at tau 2: {vllm['river-tau2']['stats']['decode_mean_exit_layer']:.0f}.", ""]
    stem = f"tokens_{args.model.replace('/', '_')}"
    write_atomically(args.out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    write_atomically(args.out / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
