"""Low-bit twins of vLLM's linear layers, and the layer that routes each token to one or the other.

A twin is built from the weight a vLLM linear layer holds right after `load_weights` (before
vLLM's `process_weights_after_loading`, which on CPU swaps `.weight` for a prepacked oneDNN
handle). Because that weight is this rank's shard, the twin shards exactly like the backbone
under tensor parallelism: column-parallel layers (qkv, gate_up) hold a slice of the output rows,
row-parallel ones (o_proj, down_proj) a slice of the input columns, and the twin's partial sums
are all-reduced like the backbone's.

vLLM fuses q/k/v and gate/up into one matrix. Each logical part (`output_partition_sizes`) is
quantized on its own, as riverllm quantizes the checkpoint's separate q_proj, k_proj, ...: HQQ's
optimizer stops on the error of the whole tensor, so quantizing the fused matrix would give
(slightly) different codes than riverllm's own river. With one rank the twins are bit-identical
to riverllm's.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import nn

from riverllm.river.quant import QuantLinear


class RiverRows:
    """Which tokens of the current flattened batch run on the river (shared by a model's layers).

    `mask` is None or a bool tensor [num_tokens]; True rows take the twin, False rows the backbone.
    `count` is mask.sum(), read once per layer rather than once per linear call.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.count = 0

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.count = 0 if mask is None else int(mask.sum())


class FusedTwin(nn.Module):
    """The twin of one fused vLLM linear: one QuantLinear per logical part, outputs concatenated."""

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([part(x) for part in self.parts], dim=-1)


def quantize_parts(linear: nn.Module, bits: int, group_size: int,
                   saved: list[tuple[torch.Tensor, dict]] | None = None) -> FusedTwin:
    """The twin of a loaded vLLM linear layer (its local shard), part by part."""
    weight = linear.weight.detach()
    bias = getattr(linear, "bias", None)
    # A row-parallel bias is added once, after the all-reduce (SplitLinear does it), never per rank.
    row_parallel = hasattr(linear, "input_is_parallel")
    sizes = list(getattr(linear, "output_partition_sizes", None) or [weight.shape[0]])
    parts, start = [], 0
    for index, size in enumerate(sizes):
        part_bias = None if bias is None or row_parallel else bias.detach()[start:start + size]
        # QuantLinear reads only .weight and .bias from the layer it replaces.
        shell = SimpleNamespace(weight=weight[start:start + size], bias=part_bias)
        parts.append(QuantLinear(shell, bits, group_size, quantized=saved[index] if saved else None))
        start += size
    return FusedTwin(parts)


def twin_state(twin: FusedTwin) -> list[tuple[torch.Tensor, dict]]:
    """HQQ's (codes, meta) per part, to cache and pass back to `quantize_parts`."""
    states = []
    for part in twin.parts:
        meta = dict(part.meta) if part.backend == "dequant" else None
        if meta is None:  # the int4 backends keep only codes/scale/zero: rebuild HQQ's meta
            meta = _meta(part)
        states.append((part.hqq_state["codes"], meta))
    return states


def _meta(part: QuantLinear) -> dict:
    packing = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}[part.bits]
    return {"nbits": part.bits, "group_size": part.group_size, "shape": torch.Size([part.out_features, part.in_features]),
            "axis": 1, "packing": packing, "unpack_view_dtype": torch.int32 if part.bits == 3 else torch.uint8,
            "view_as_float": False, "scale": part.hqq_state["scale"], "zero": part.hqq_state["zero"]}


def fingerprint(tensors: list[tuple[str, torch.Tensor]], bits: int, group_size: int, rank: int) -> str:
    """A cheap identity of the weights a set of twins is built from: names, shapes and samples
    (hashing every byte would cost seconds per start; a stale hit needs weights edited in place)."""
    digest = hashlib.sha256(f"b{bits}-g{group_size}-rank{rank}".encode())
    for name, tensor in tensors:
        flat = tensor.detach().flatten()
        sample = torch.cat([flat[:1024], flat[-1024:], flat[:: max(1, flat.numel() // 1024)]])
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class SplitLinear(nn.Module):
    """Stands where a vLLM linear layer stood; each token goes through the backbone layer or its twin.

    It keeps vLLM's calling convention (returns `(output, bias)`), so the decoder layer's own
    forward, attention call included, runs unchanged: linear layers split by token subset, one
    attention call over the whole flattened batch writes every token's K/V into the paged cache.
    """

    def __init__(self, backbone: nn.Module, twin: FusedTwin, rows: RiverRows):
        super().__init__()
        self.backbone, self.twin, self.rows = backbone, twin, rows
        self.output_size = sum(part.out_features for part in twin.parts)
        # Row-parallel layers sum partial products across ranks; the twin must do the same.
        self.reduce = bool(getattr(backbone, "reduce_results", False)) and getattr(backbone, "tp_size", 1) > 1
        self.row_bias = getattr(backbone, "bias", None) if hasattr(backbone, "input_is_parallel") else None

    def _twin(self, x: torch.Tensor) -> torch.Tensor:
        y = self.twin(x)
        if self.reduce:
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y)
        return y if self.row_bias is None else y + self.row_bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask, n_river = self.rows.mask, self.rows.count
        if mask is None or n_river == 0:
            return self.backbone(x)
        if n_river == x.shape[0]:
            return self._twin(x), None
        out = x.new_empty(x.shape[0], self.output_size)
        keep = ~mask
        out[keep] = self.backbone(x[keep])[0]
        out[mask] = self._twin(x[mask])
        return out, None
