"""What a 4-bit LM head costs and saves (issue 12's `--head-bits`), measured in one sitting.

    python scripts/head_bits.py qwen2.5-coder-0.5b docs/results/head_bits_qwen0.5b [--tokens 1024]

Fidelity: teacher-forced agree / KL against dense on held-out Brown text (the calibration
windows, disjoint from eval's), for dense, river:0.9 and w4, each with the model's head and with
the 4-bit copy. Speed: the LM head alone (one row, median of 20 calls) and whole greedy
generations (batch 1, 64 tokens, 3 prompts), one intra-op thread. Writes head_bits.json and
head_bits.md."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import riverllm
from riverllm.calibrate import calibration_segments
from riverllm.fidelity import References, measure
from riverllm.files import write_text_atomic

METHODS = ("dense", "river:0.9", "w4")


def head_ms(lm, head) -> float:
    hidden = torch.randn(1, 1, lm.model.config.hidden_size, dtype=lm.engine.dtype)
    times = []
    for _ in range(21):
        start = time.perf_counter()
        lm.engine.head(hidden, head)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 1024
    torch.set_num_threads(1)
    lm = riverllm.load(model, progress=False)
    head = lm.low_bit_head(4)
    segments, text = calibration_segments(lm, tokens=tokens)
    references = References(lm)
    rows = []
    for method in METHODS:
        for bits in (None, 4):
            fidelity = measure(lm, segments, method, references, head_bits=bits)
            rows.append(dict(method=method, head_bits=bits or "model's", agree=fidelity.agree, kl=fidelity.kl,
                             positions=fidelity.positions, mean_exit_layer=fidelity.mean_exit_layer))
    prompts = ["Write a Python function that checks whether a number is prime.",
               "A farmer has 17 sheep and buys 5 more. How many sheep are there?",
               "Explain what a hash map is in two sentences."]
    speed = []
    for method in METHODS:
        for bits in (None, 4):
            lm.generate(prompts[0], method=method, max_new_tokens=2, head_bits=bits)
            rates = [lm.generate(p, method=method, max_new_tokens=64, ignore_eos=True, head_bits=bits).tokens_per_s
                     for p in prompts]
            speed.append(dict(method=method, head_bits=bits or "model's", tokens_per_s=statistics.median(rates)))
    result = dict(model=model, text=text, fidelity=rows, generation=speed,
                  head_ms={"model": head_ms(lm, None), "4bit": head_ms(lm, head)},
                  threads=1, load_average=list(os.getloadavg()), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M"))
    write_text_atomic(out / "head_bits.json", json.dumps(result, indent=2) + "\n")
    lines = [f"# The 4-bit LM head on {model}", "",
             f"One thread, torch {torch.__version__}, load average {', '.join(f'{x:.1f}' for x in result['load_average'])}"
             f" at the end, {result['date']}. Command: `python scripts/head_bits.py {model} {out} --tokens {tokens}`.", "",
             f"LM head alone, one row: {result['head_ms']['model']:.1f} ms with the model's head, "
             f"{result['head_ms']['4bit']:.1f} ms with the 4-bit copy.", "",
             f"Fidelity against dense, teacher-forced on {rows[0]['positions']} held-out Brown positions:", "",
             "| method | head | agree | KL (nats) | mean exit layer |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['head_bits']} | {r['agree']:.3f} | {r['kl']:.4f} | {r['mean_exit_layer']:.2f} |"
              for r in rows]
    lines += ["", "Greedy generation, batch 1, 64 tokens, median of 3 prompts:", "", "| method | head | tok/s |",
              "|---|---|---|"]
    lines += [f"| {r['method']} | {r['head_bits']} | {r['tokens_per_s']:.2f} |" for r in speed]
    write_text_atomic(out / "head_bits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
