"""Replay prompt-lookup rules over dense outputs: which lookup rule should lossless decoding use?

Greedy lossless decoding accepts a copied draft exactly where it equals dense's next token, so
how many tokens each cycle accepts under a lookup rule can be replayed from the dense outputs of
a `riverllm bench --exact` run, without running the model. A cycle's cost comes from a simple
model: a verify pass costs `--verify-ms` whatever its rows (bfloat16 GEMMs on the AMD EPYC are
flat over 1-8 rows), a River draft `--draft-ms`, and a River cycle drafts `--drafts` tokens each
accepted with probability `--acceptance` (seeded). The absolute tok/s are the model's; the ranking
of the rules is the point. Defaults: the 0.5B in bfloat16 at one thread (dense step 150 ms; a
River draft with the 4-bit head 81 ms, from lossless River-only decoding's 9.50 tok/s at 4 drafts).

    python scripts/replay_lookup.py docs/results/lossless_qwen0.5b_full_bf16 --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

import riverllm
from riverllm.bench.batch import bench_prompts
from riverllm.engine.lossless import lookup_drafts

# A rule: (consecutive failed lookups so far) -> the least n-gram a lookup may match, 0 for no lookup.
RULES: dict[str, Callable[[int], int]] = {
    "River drafts only": lambda misses: 0,
    "lookup, 2-gram or longer (the default)": lambda misses: 2,
    "lookup, 3-gram or longer": lambda misses: 3,
    "lookup, 4-gram only": lambda misses: 4,
    "2-gram; one River cycle after a miss": lambda misses: 0 if misses else 2,
    "2-gram; 3-gram after a miss": lambda misses: 3 if misses else 2,
}


def replay(rule: Callable[[int], int], outputs: list[tuple[list[int], list[int]]], args) -> tuple[float, float]:
    """(modelled tok/s, share of copied drafts accepted) of `rule` over (prompt ids, dense output) pairs."""
    rng = random.Random(0)
    seconds = tokens = copied = copied_accepted = 0
    for prompt, output in outputs:
        done, misses = 1, 0  # the prefill gives the first token
        while done < len(output):
            least = rule(misses)
            drafts = lookup_drafts(prompt + output[:done], args.lookup, least) if least else []
            if drafts:
                accepted = 0
                while accepted < len(drafts) and done + accepted < len(output) \
                        and drafts[accepted] == output[done + accepted]:
                    accepted += 1
                copied, copied_accepted = copied + len(drafts), copied_accepted + accepted
                misses = 0 if accepted else misses + 1
                seconds += args.verify_ms / 1000
            else:
                accepted, misses = 0, 0  # a River cycle; the next one may look up again
                while accepted < args.drafts and rng.random() < args.acceptance:
                    accepted += 1
                seconds += (args.drafts * args.draft_ms + args.verify_ms) / 1000
            tokens += 1 + accepted
            done += 1 + accepted
    return tokens / seconds, copied_accepted / max(copied, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a `riverllm bench --exact` output folder (its samples.jsonl)")
    parser.add_argument("--model", required=True, help="the model of that run (for its prompts' token ids)")
    parser.add_argument("--lookup", type=int, default=7, help="copied drafts per cycle at most")
    parser.add_argument("--verify-ms", type=float, default=150.0)
    parser.add_argument("--draft-ms", type=float, default=81.0)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--acceptance", type=float, default=0.93)
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.folder / "samples.jsonl").read_text().splitlines()]
    dense = {r["prompt"]: r["tokens"] for r in records if r["method"] == "dense"}
    lm = riverllm.load(args.model, progress=False)
    prompts = dict(bench_prompts(("humaneval", "gsm8k"), max(int(k.split("/")[1]) for k in dense) + 1))
    print(f"{len(dense)} dense outputs of {args.folder}; modelled tok/s (verify {args.verify_ms:g} ms, River draft "
          f"{args.draft_ms:g} ms, {args.drafts} drafts at {args.acceptance:.0%}), share of copied drafts accepted")
    for task in ("humaneval", "gsm8k"):
        outputs = [(lm.encode(prompts[key]), tokens) for key, tokens in dense.items() if key.startswith(task)]
        print(f"\n| {task} ({len(outputs)} prompts) | modelled tok/s | copied drafts accepted |\n|---|---|---|")
        for name, rule in RULES.items():
            speed, accepted = replay(rule, outputs, args)
            print(f"| {name} | {speed:.2f} | {accepted:.0%} |")


if __name__ == "__main__":
    main()
