"""How torch's CPU int4 kernel (the river's 4-bit twins) scales with the rows of a batch, against
this core's float32 and bfloat16 GEMM rates: is a 16-row twin step bound by compute?

    python scripts/int4_rows.py docs/results/engine_cpu/int4_rows

Writes int4_rows.json and int4_rows.md in the folder. One intra-op thread; weights stay in cache
(the same weights are multiplied over and over), so the times are the kernel's compute, not its
memory traffic. Shapes: Qwen2.5-Coder-0.5B's projections, random 4-bit codes, group size 64.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from riverllm.bench.batch import environment, environment_line
from riverllm.files import write_text_atomic

SHAPES = {"q/o 896x896": (896, 896), "gate/up 4864x896": (4864, 896), "down 896x4864": (896, 4864)}
ROWS = (1, 2, 4, 8, 16)
GROUP_SIZE = 64


def median_ms(call, repeats: int = 31) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def gemm_gflops(dtype: torch.dtype, size: int = 768) -> float:
    """A square matmul small enough to time between the scheduler's preemptions on a shared
    machine (the median of many short calls), large enough to run at about the core's peak in
    `dtype` (MKL for float32, oneDNN for bfloat16)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2 * size ** 3 / (median_ms(lambda: a @ b) / 1e3) / 1e9


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        scales_and_zeros = (torch.randn(k // GROUP_SIZE, n, 2) * 0.01).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k).to(torch.bfloat16)
            ms = median_ms(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros))
            rows.append(dict(shape=name, rows=m, ms=ms, gflops=2 * m * n * k / (ms / 1e3) / 1e9))
    peaks = {"float32": gemm_gflops(torch.float32), "bfloat16": gemm_gflops(torch.bfloat16)}
    result = dict(rows=rows, gemm_gflops=peaks, environment=environment())

    lines = ["# torch's CPU int4 kernel against the rows of a batch", "",
             environment_line(result["environment"], "at start"), "",
             "```", "python scripts/int4_rows.py " + str(out), "```", "",
             "| shape | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in ROWS) + " | 16 vs 4 rows |",
             "|---|" + "---|" * (len(ROWS) + 1)]
    for name in SHAPES:
        cells = [r for r in rows if r["shape"] == name]
        by_rows = {r["rows"]: r for r in cells}
        lines.append(f"| {name} | " + " | ".join(f"{r['ms']:.3f} ms ({r['gflops']:.0f} GFLOP/s)" for r in cells)
                     + f" | {by_rows[16]['ms'] / by_rows[4]['ms']:.2f}x |")
    lines += ["", f"Large square GEMMs on the same core: float32 {peaks['float32']:.0f} GFLOP/s, "
              f"bfloat16 {peaks['bfloat16']:.0f} GFLOP/s."]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "int4_rows.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "int4_rows.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/int4_rows.py OUT_DIR")
    main(Path(sys.argv[1]))
