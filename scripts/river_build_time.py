"""Time the river's HQQ quantization, whole-matrix (HQQ's own `Quantizer.quantize`, as riverllm
did before) against block-wise (`quant.hqq_quantize`), on a real model's decoder matrices, and
compare their reconstruction errors. Reads the weights from a cached backbone's safetensors.

    python scripts/river_build_time.py ~/.cache/riverllm/backbones/qwen2.5-coder-1.5b-float32 \
        --layers 0,13 --threads 1 --out docs/results/model_cache/build_qwen1.5b

--all-layers times the block-wise build of every layer (the whole river, new way only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from hqq.core.quantize import Quantizer
from safetensors import safe_open

from riverllm.river.quant import hqq_quantize

LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.\w+_proj\.weight$")


def error(weight: torch.Tensor, codes: torch.Tensor, meta: dict) -> float:
    return float((Quantizer.dequantize(codes, meta).reshape(weight.shape) - weight).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", type=Path, help="a cached backbone folder (holds model.safetensors)")
    parser.add_argument("--layers", default="0", help="comma-separated layer indices to compare")
    parser.add_argument("--all-layers", action="store_true", help="also time the block-wise build of every layer")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    handle = safe_open(str(args.entry / "model.safetensors"), "pt")
    names = {name: int(match.group(1)) for name in handle.keys() if (match := LINEAR.match(name))}
    num_layers = max(names.values()) + 1
    rows = []
    for layer in (int(x) for x in args.layers.split(",")):
        for name in sorted(n for n, i in names.items() if i == layer):
            weight = handle.get_tensor(name).float()
            start = time.perf_counter()
            whole = Quantizer.quantize(weight, nbits=args.bits, group_size=args.group_size, optimize=True, axis=1,
                                       compute_dtype=torch.float32, device="cpu")
            whole_s = time.perf_counter() - start
            start = time.perf_counter()
            blocks = hqq_quantize(weight, args.bits, args.group_size)
            blocks_s = time.perf_counter() - start
            rows.append({"matrix": name, "shape": list(weight.shape), "whole_s": whole_s, "blocks_s": blocks_s,
                         "whole_err": error(weight, *whole), "blocks_err": error(weight, *blocks)})
            print(rows[-1], flush=True)
    result = {"entry": str(args.entry), "threads": args.threads, "bits": args.bits, "group_size": args.group_size,
              "num_layers": num_layers, "matrices": rows, "load_average_after": os.getloadavg()}
    per_layer_whole = sum(r["whole_s"] for r in rows) / len(args.layers.split(","))
    per_layer_blocks = sum(r["blocks_s"] for r in rows) / len(args.layers.split(","))
    result["per_layer_s"] = {"whole": per_layer_whole, "blocks": per_layer_blocks,
                             "whole_times_layers": per_layer_whole * num_layers,
                             "blocks_times_layers": per_layer_blocks * num_layers}
    if args.all_layers:
        start = time.perf_counter()
        for name in names:
            hqq_quantize(handle.get_tensor(name).float(), args.bits, args.group_size)
        result["all_layers_blocks_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| matrix | shape | whole-matrix HQQ (s) | block-wise (s) | speed-up | mean abs error whole / blocks |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['whole_s']:.2f} | {r['blocks_s']:.2f} | "
              f"{r['whole_s'] / r['blocks_s']:.1f}x | {r['whole_err']:.7f} / {r['blocks_err']:.7f} |" for r in rows]
    text = "\n".join(lines) + (
        f"\n\nper layer: whole {per_layer_whole:.1f} s, blocks {per_layer_blocks:.1f} s; times {num_layers} layers: "
        f"{per_layer_whole * num_layers:.0f} s vs {per_layer_blocks * num_layers:.0f} s"
        + (f"; measured block-wise build of all layers: {result['all_layers_blocks_s']:.0f} s" if args.all_layers else "")
        + f" ({args.threads} thread(s), load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
