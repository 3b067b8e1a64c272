"""Building the Exit River: one low-bit twin per decoder layer, no data, no training.

A twin is the decoder layer's own module (same class, same forward) in which every `nn.Linear`
of attention and MLP is replaced by a `QuantLinear`. Norms are shared with the backbone, not
copied (they are tiny and stay full precision, as in the paper). The twin keeps the layer's
`layer_idx`, so it reads and writes the very same KV-cache slot as backbone layer j: that is
River-LLM's KV sharing, and why the cache never has holes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from riverllm.river.quant import QuantLinear

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    backend: str = "auto"  # auto | int4_cuda | int4_cpu | dequant

    def __post_init__(self) -> None:
        from riverllm.errors import RiverError

        if self.bits not in SUPPORTED_BITS:
            raise RiverError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise RiverError(f"--group-size must be one of 16, 32, 64, 128, 256, got {self.group_size}")


def _make_twin(layer: nn.Module, config: QuantConfig) -> nn.Module:
    # Copy the module tree without copying any tensor: every parameter and buffer of the twin
    # starts as the backbone's own tensor, then the linears are swapped for quantized ones.
    memo = {id(tensor): tensor for tensor in list(layer.parameters()) + list(layer.buffers())}
    twin = copy.deepcopy(layer, memo)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, QuantLinear(child, config.bits, config.group_size, config.backend))
    return twin


@torch.no_grad()
def build_river(layers: nn.ModuleList, config: QuantConfig = QuantConfig(), progress: bool = False) -> nn.ModuleList:
    """Return the Exit River: `river[j]` is the low-bit twin of `layers[j]`."""
    bar = tqdm(layers, desc=f"building the {config.bits}-bit river", unit="layer", disable=not progress, leave=False)
    return nn.ModuleList(_make_twin(layer, config) for layer in bar)


def river_memory_bytes(river: nn.ModuleList) -> int:
    """Bytes of quantized weights in the river (norms are shared with the backbone and not counted)."""
    return sum(m.weight_bytes() for m in river.modules() if isinstance(m, QuantLinear))
