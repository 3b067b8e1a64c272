"""Batch-1 decode speed of a riverllm checkout, through its public API only (riverllm.load,
RiverLM.generate), so that the same script times an older commit and the current one:

    PYTHONPATH=/path/to/old/src python scripts/decode_speed.py --model qwen2.5-coder-0.5b --out before.json
    python scripts/decode_speed.py --model qwen2.5-coder-0.5b --out after.json

Each method decodes `--new-tokens` tokens (EOS ignored) after each of `--prompts` GSM8K prompts,
single-threaded by default; tok/s is the engine's own decode rate (tokens after the first over
their time), reported as min/median/max over prompts x repeats, methods interleaved per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--methods", default="dense,w4,river:0.9")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import riverllm
    from riverllm.eval.tasks import make_task

    lm = riverllm.load(args.model, progress=False)
    task = make_task("gsm8k")
    prompts = [task.prompt(sample, chat=True) for sample in task.samples(args.prompts, 0, progress=False)]
    methods = [m.strip() for m in args.methods.split(",")]
    for method in methods:  # build rivers and warm up outside the timing
        lm.generate(prompts[0], method=method, max_new_tokens=4, ignore_eos=True)
    rates: dict[str, list[float]] = {m: [] for m in methods}
    exits: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for prompt in prompts:
            for method in methods:
                result = lm.generate(prompt, method=method, max_new_tokens=args.new_tokens, ignore_eos=True)
                rates[method].append(result.tokens_per_s)
                exits[method].append(result.mean_exit_layer)
    report = {
        "model": args.model, "threads": args.threads, "new_tokens": args.new_tokens, "prompts": args.prompts,
        "repeats": args.repeats, "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
        "riverllm": os.path.dirname(riverllm.__file__), "torch": torch.__version__,
        "methods": {m: {"tok_s_min": min(r), "tok_s_median": statistics.median(r), "tok_s_max": max(r),
                        "mean_exit_layer": statistics.mean(exits[m])} for m, r in rates.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
