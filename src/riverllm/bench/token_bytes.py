"""What a decoding token reads on the ggml path, in bytes: the ceiling on River's speedup there.

Batch-1 decoding on a CPU is bound by reading weights (docs/kernels.md), so the bytes a token
reads bound its speed. On the ggml path (`--kernels ggml`) the backbone and the LM head are the
GGUF's own blocks (as llama.cpp reads them) and the twins are the river's int4 codes and scales
(other bit widths: their packed codes and scales, though they decode by dequantizing). A token
that leaves after backbone layer K reads backbone layers 1..K, twins K+1..L and the head.
Norms, biases and the KV cache are left out (small next to the matrices at these lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from riverllm.errors import RiverError
from riverllm.river.quant import QuantLinear


@dataclass(frozen=True)
class TokenBytes:
    """Bytes of backbone layer l (index l-1), of twin layer l, and of the LM head."""

    backbone: list[int]
    twins: list[int]
    head: int

    @property
    def dense(self) -> int:
        return self.at_depth(len(self.backbone))

    def at_depth(self, depth: int) -> int:
        """A token that leaves after backbone layer `depth` (river@depth; 0 is wN, L dense)."""
        return sum(self.backbone[:depth]) + sum(self.twins[depth:]) + self.head

    def at_depths(self, depths: list[int]) -> float:
        """Mean over tokens that left at `depths` (River's recorded exit layers)."""
        return sum(self.at_depth(d) for d in depths) / len(depths)

    def mixed(self, last: int) -> int:
        """wN-last{last}: twins 1..L-last, then the backbone's last `last` layers."""
        split = len(self.backbone) - last
        return sum(self.twins[:split]) + sum(self.backbone[split:]) + self.head

    def fallback(self, depth: int) -> int:
        """What a token that left after `depth` reads again to fall back to the backbone: the
        backbone layers after it, and the head."""
        return sum(self.backbone[depth:]) + self.head

    def equivalent_depth(self, num_bytes: float) -> float:
        """The (fractional) fixed depth that reads `num_bytes` per token."""
        points = [(self.at_depth(k), float(k)) for k in range(len(self.backbone) + 1)]
        if num_bytes <= points[0][0]:
            return 0.0
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= num_bytes <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (num_bytes - x0) / (x1 - x0)
        return float(len(self.backbone))


def quantized_bytes(module: nn.Module) -> int:
    # the codes, not a dequantized copy kept for speed on a CPU without a kernel for the width
    return sum(m.code_bytes() for m in module.modules() if isinstance(m, QuantLinear))


def ggml_token_bytes(gguf_path, num_layers: int, river: nn.ModuleList, head: nn.Module | None = None) -> TokenBytes:
    """Bytes per token on the ggml path for a model loaded from `gguf_path` and its `river`;
    `head`: a low-bit LM head (`riverllm.river.low_bit_head`) in place of the GGUF's."""
    from gguf import GGUFReader

    if gguf_path is None:
        raise RiverError("the bytes a token reads on the ggml path are priced from the model's GGUF file; "
                         "this model has none")
    tensors = GGUFReader(str(gguf_path)).tensors
    backbone = [sum(int(t.n_bytes) for t in tensors
                    if t.name.startswith(f"blk.{j}.") and t.name.endswith(".weight") and "norm" not in t.name)
                for j in range(num_layers)]
    by_name = {t.name: int(t.n_bytes) for t in tensors}
    gguf_head = by_name.get("output.weight", by_name.get("token_embd.weight", 0))  # tied: the embedding
    return TokenBytes(backbone, [quantized_bytes(layer) for layer in river],
                      gguf_head if head is None else quantized_bytes(head))
