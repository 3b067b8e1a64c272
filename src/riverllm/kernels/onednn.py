"""bfloat16 linear layers on oneDNN with their weights packed once (CPU).

`F.linear` on a bfloat16 CPU tensor runs oneDNN's matrix kernel, which first copies the weight
into its own blocked layout, on every call. For a decoding step (1-16 rows) that copy is a
second pass over the weight, the dominant cost: measured on the 2-core AMD EPYC (AVX512-BF16, one
thread, weights out of cache), Qwen2.5-Coder-0.5B's 151,936 x 896 LM head took 30.0 ms for one
row and 46.8 ms for 16; packed once with `torch.ops.mkldnn._reorder_linear_weight` (what
inductor's CPU freezing pass does), 16.6 and 27.7 ms; a 4864 x 896 MLP matrix 0.93 -> 0.57 ms for
one row (docs/kernels.md). The kernel is the same, so the result is bit-identical to `F.linear`
at every row count (checked once per process on this CPU by `packing_is_exact`, and tested):
tokens do not change, only the time.

Only bfloat16 (and float16) weights are packed: float32 `F.linear` runs MKL, whose sums differ in
the last bit from oneDNN's, and transformers' float32 results are the reference the tests match.
The packed copy doubles the memory of the weights it covers (the model's own modules keep theirs
for transformers' `generate` and for building the river), so `pack_projections` packs nothing when
the machine lacks the memory.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from riverllm import cpu
from riverllm.engine.block import Projections

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float16)
# Prompts (many rows) take F.linear: at 512 rows its unpacked call is as fast or faster (21.9 vs
# 24.2 ms for a 4864 x 896 matrix), and the numbers are the same either way.
MAX_PACKED_ROWS = 64


class PackedLinear(nn.Linear):
    """An nn.Linear whose weight is also held in oneDNN's blocked layout: the same results as
    the plain layer, bit for bit. It shares the original's weight and bias (nothing is copied but
    the packed layout), so it still reads as that nn.Linear to everything else."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: that would allocate a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_PACKED_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for oneDNN"


@lru_cache(maxsize=None)
def packing_is_exact(dtype: torch.dtype) -> bool:
    """Do packed products equal F.linear's on this CPU and torch, for 1..16 rows, with a bias?
    (False, too, where torch lacks the ops.)"""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(192, 320, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(320, 192, generator=generator) * 0.05)
        linear.bias.copy_(torch.randn(320, generator=generator))
        x = torch.randn(16, 1, 192, generator=generator).to(dtype)
        try:
            packed = PackedLinear(linear)
            return all(torch.equal(packed(x[:rows]), F.linear(x[:rows], linear.weight, linear.bias))
                       for rows in range(1, 17))
        except (RuntimeError, AttributeError, NotImplementedError):
            return False


def can_pack(linears: list[nn.Linear]) -> bool:
    """Whether `pack_projections` packs these: CPU weights in a packed dtype, exact packing on this
    machine, and memory for the copies."""
    if not linears:
        return False
    weight = linears[0].weight
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or not packing_is_exact(weight.dtype):
        return False
    needed = sum(linear.weight.nbytes for linear in linears)
    if not cpu.has_memory_for(needed):
        log.info("not packing the weights for oneDNN: not twice their %.1f GB available", needed / 1e9)
        return False
    return True


def pack_projections(backbone: list[Projections | None], head: nn.Module) -> tuple[list[Projections | None], nn.Module]:
    """The engine's backbone projections and LM head with every plain nn.Linear packed, if they
    can be (`can_pack`); otherwise the same modules back."""
    linears = [module for weights in backbone if weights is not None for module in weights.modules()
               if type(module) is nn.Linear]
    if type(head) is nn.Linear:
        linears.append(head)
    if not can_pack(linears):
        return backbone, head
    packed = {id(linear): PackedLinear(linear) for linear in linears}

    def swap(module: nn.Module) -> nn.Module:
        return packed.get(id(module), module)

    return [None if weights is None else weights.map(swap) for weights in backbone], swap(head)
