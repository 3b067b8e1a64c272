"""Which taus to study: the mean exit layer River's rule picks at each tau, on the model's own
GSM8K answers (issue 11: "river at 4 or more taus whose mean exit layers span about 3 layers to
half the depth").

    python scripts/tau_depths.py qwen2.5-coder-1.5b docs/results/study_qwen1.5b [--samples 30] [--dtype bfloat16]

Reads the dense records the study wrote (STUDY_DIR/samples/gsm8k/dense.jsonl), runs each
prompt + dense answer once through the full backbone recording the similarity s_l of every
answer position at every layer, and applies the exit rule (first layer l > 1 with s_l > tau) for
every tau of a grid. A proxy, said plainly: in a real River run a token's K/V at the layers past
its exit come from the twins, so later positions see slightly different states. On the 0.5B
(30 answers) the proxy gives 2.91 / 4.42 / 8.48 layers at tau 0.85 / 0.9 / 0.94, the decoded
study records (100 answers) 2.91 / 4.38 / 8.30. Writes
tau_depths.json and tau_depths.md in STUDY_DIR. One intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TAUS = (0.8, 0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--samples", type=int, default=30, help="dense GSM8K answers to read (default 30)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the study's, from run.json)")
    args = parser.parse_args()

    import riverllm
    from riverllm.cpu import parse_dtype
    from riverllm.errors import RiverError
    from riverllm.eval.tasks import make_task
    from riverllm.files import write_text_atomic
    from riverllm.inspect import rule_exits, similarities

    try:
        records_path = args.study_dir / "samples" / "gsm8k" / "dense.jsonl"
        if not records_path.exists():
            raise RiverError(f"{records_path} does not exist: run the study's dense GSM8K first")
        records = [json.loads(line) for line in records_path.read_text().splitlines()[:args.samples]]
        dtype = args.dtype
        run_json = args.study_dir / "run.json"
        if dtype is None and run_json.exists():
            dtype = json.loads(run_json.read_text()).get("dtype")
        torch.set_num_threads(1)
        lm = riverllm.load(args.model, dtype=parse_dtype(dtype), progress=False)
        task = make_task("gsm8k")
        samples = {s.id: s for s in task.samples(None, 0, progress=False)}
        # per tau: every answer position's exit layer
        exits: dict[float, list[int]] = {tau: [] for tau in TAUS}
        for record in records:
            prompt_ids = lm.encode(task.prompt(samples[record["id"]], chat=lm.has_chat_template))
            ids = prompt_ids + record["token_ids"][:-1]  # the last token is never fed back
            sims = similarities(lm, ids)[len(prompt_ids):]
            for tau in TAUS:
                exits[tau] += rule_exits(sims, tau)
    except RiverError as error:
        sys.exit(f"error: {error}")

    layers = lm.engine.num_layers
    table = [dict(tau=tau, mean_exit_layer=sum(e) / len(e), full_precision_share=sum(e) / len(e) / layers,
                  positions=len(e)) for tau, e in exits.items()]
    lines = [f"# River's exit depth against tau: {args.model} ({layers} layers)", "",
             f"The exit rule on the similarities of {len(records)} of dense's GSM8K answers "
             f"({table[0]['positions']} positions), full backbone (a proxy: see scripts/tau_depths.py).", "",
             "```", f"python scripts/tau_depths.py {args.model} {args.study_dir} --samples {args.samples}", "```", "",
             "| tau | mean exit layer | share of layers at full precision |", "|---|---|---|"]
    lines += [f"| {r['tau']:g} | {r['mean_exit_layer']:.2f} | {100 * r['full_precision_share']:.0f}% |" for r in table]
    write_text_atomic(args.study_dir / "tau_depths.json", json.dumps(dict(model=args.model, layers=layers,
                                                                        rows=table), indent=1) + "\n")
    write_text_atomic(args.study_dir / "tau_depths.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
