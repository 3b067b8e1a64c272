"""CPU settings a user would pick: how many threads, which backbone dtype.

Threads. torch splits every matrix product and attention call of a decoding step evenly between
its threads and waits for all of them (static OpenMP scheduling). When another process holds a
core, the thread that shares it is descheduled and every parallel region waits for it: measured
on Qwen2.5-Coder-0.5B, 2 threads on 2 cores under load 5 (docs/results/model_cache/): `addmm`
0.13 ms -> 3.1 ms per call, `scaled_dot_product_attention` 0.06 -> 2.5 ms, dense decoding 6.2
-> 1.1-1.9 tok/s in float32 and 7.3 -> 0.9-1.2 tok/s in bfloat16. The stall is the thread count,
not the dtype: bfloat16 only made it visible first. So riverllm uses as many threads as there are
idle cores when it starts (cores minus the 1-minute load average, rounded), at least one; a
quiet machine gets all of torch's threads, a busy laptop one per free core. OMP_NUM_THREADS or
--threads overrides it.

Dtype. With native bfloat16 matrix units (AVX512-BF16 or AMX on x86), a bfloat16 backbone reads
half the bytes of float32 and decodes faster at one thread (0.5B dense 7.3 vs 6.2 tok/s), so
`generate`, `chat` and `serve` pick it there, float32 elsewhere (emulated bfloat16 is slow).
Measurements that compare against published or committed float32 figures (`eval`, `calibrate`,
`bench`) keep float32 unless told otherwise. A bfloat16 backbone rounds the GGUF's weights once
more: its distance from the float32 backbone is in docs/results/model_cache/.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

from riverllm.errors import RiverError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype` as a torch dtype (None and "auto": let riverllm pick)."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise RiverError(f"--dtype must be auto, {', '.join(DTYPES)}; got '{name}'") from None


@lru_cache(maxsize=1)
def has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 in hardware? (Linux: the kernel's CPU flags.)"""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = set(handle.read().split())
    except OSError:
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def idle_threads() -> int:
    """Threads worth running now: idle cores (cores minus the 1-minute load average), at least 1,
    at most torch's own default (the physical cores)."""
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not every platform has a load average
        return torch.get_num_threads()
    idle = int((os.cpu_count() or 1) - busy + 0.5)
    return max(1, min(torch.get_num_threads(), idle))


def pick_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads` if given, else OMP_NUM_THREADS if the user set it,
    else the idle cores. Returns the number set."""
    if threads is not None:
        if threads < 1:
            raise RiverError(f"--threads must be at least 1, got {threads}")
    elif os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()  # torch already read it
    else:
        threads = idle_threads()
    torch.set_num_threads(threads)
    return threads


def fast_cpu_dtype() -> torch.dtype:
    """The backbone dtype that decodes fastest on this CPU (see the module's docstring)."""
    return torch.bfloat16 if has_native_bf16() else torch.float32


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def has_memory_for(nbytes: int, margin: float = 2.0) -> bool:
    """Whether a copy of `nbytes` fits with room to spare: `margin` times it available (True where
    the platform does not say). One rule for every optional copy riverllm makes (packed weights,
    dequantized twins)."""
    free = available_memory()
    return free is None or free >= margin * nbytes
