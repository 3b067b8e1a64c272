"""The bytes a decoding token reads on the ggml path, per method: the ceiling on each method's
batch-1 speedup over dense (and over llama.cpp, which reads what dense reads) on a CPU, where
decoding is bound by reading weights (docs/kernels.md).

    python scripts/token_bytes.py qwen2.5-coder-0.5b qwen2.5-coder-1.5b --out docs/results/token_bytes [--bits 4,3]

Backbone and LM head: the GGUF's own blocks; twins: the river's codes and scales
(riverllm/bench/token_bytes.py). River at a fractional mean depth is priced by linear
interpolation between the neighbouring fixed depths (the layers of these models are of one size).
Writes token_bytes.json and token_bytes.md under OUT."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import riverllm
from riverllm.bench.token_bytes import TokenBytes, ggml_token_bytes
from riverllm.errors import RiverError
from riverllm.files import write_text_atomic

DEPTHS = (0, 2, 4, 8, 12)  # river@K rows (0 is wN)
MB = 1e6


def at_mean_depth(costs: TokenBytes, depth: float) -> float:
    low = int(depth)
    high = min(low + 1, len(costs.backbone))
    return costs.at_depth(low) + (depth - low) * (costs.at_depth(high) - costs.at_depth(low))


def measure(model: str, bits_list: list[int], mean_depths: dict[str, float]) -> dict:
    lm = riverllm.load(model, progress=False)
    rows = [{"method": "dense (= llama.cpp's reads)", "mb": None}]
    dense = None
    for bits in bits_list:
        river = lm.river(bits)
        for head_bits in (None, 4):
            head = None if head_bits is None else lm.low_bit_head(head_bits)
            costs = ggml_token_bytes(lm.gguf_path, lm.num_layers, river, head)
            dense = dense or costs.dense
            suffix = "" if head_bits is None else "+head4"
            for depth in DEPTHS:
                name = f"w{bits}" if depth == 0 else f"river{'' if bits == 4 else bits}@{depth}"
                rows.append({"method": name + suffix, "mb": costs.at_depth(depth) / MB})
            for name, depth in mean_depths.items():
                rows.append({"method": f"{name.replace('river', 'river' if bits == 4 else f'river{bits}')}{suffix} "
                                       f"(mean exit {depth})", "mb": at_mean_depth(costs, depth) / MB})
    rows[0]["mb"] = dense / MB
    for row in rows:
        row["vs_dense"] = dense / MB / row["mb"]
    return {"model": model, "num_layers": lm.num_layers, "gguf": lm.gguf_path.name, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Bytes a decoding token reads on the ggml path", "",
             f"Command: `{result['command']}` ({result['date']}). Backbone and LM head as the GGUF stores them "
             "(what llama.cpp reads for every token), twins as the river's codes and scales; norms, biases and the "
             "KV cache left out. `ceiling` = dense's bytes / the method's: the most a memory-bound step can gain "
             "over dense, and over llama.cpp on the same file.", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} ({model['gguf']}, {model['num_layers']} layers)", "",
                  "| method | MB per token | ceiling vs dense |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['mb']:.1f} | {r['vs_dense']:.2f}x |" for r in model["rows"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="packaged names or .gguf files")
    parser.add_argument("--out", type=Path, required=True, help="directory for token_bytes.json / .md")
    parser.add_argument("--bits", default="4,3", help="river bit widths, comma-separated")
    parser.add_argument("--mean-depths", default="river:0.9=4.4,river:0.94=8.3",
                        help="River settings priced at their measured mean exit layer: NAME=DEPTH,...")
    args = parser.parse_args()
    try:
        bits_list = [int(b) for b in args.bits.split(",")]
        mean_depths = {name: float(depth) for name, depth in (item.split("=") for item in args.mean_depths.split(","))}
    except ValueError:
        parser.error("--bits takes integers (4,3) and --mean-depths NAME=DEPTH pairs (river:0.9=4.4)")
    result = {"command": "python scripts/token_bytes.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "models": [measure(model, bits_list, mean_depths) for model in args.models]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "token_bytes.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    write_text_atomic(args.out / "token_bytes.md", text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except RiverError as error:
        sys.exit(f"error: {error}")
