"""Linear layers that compute with ggml on quantized blocks: the GGUF backbone as stored, and the
river's int4 twins repacked as ggml Q4_1.

`backbone_projections(gguf_path, engine)` reads each decoder layer's projection matrices straight
from the GGUF file (memory-mapped, never dequantized) and returns the engine's `Projections` with
`GGMLLinear` modules in place of the dequantized `nn.Linear`s. `twin_projections(twins)` does the
same for a river: HQQ's int4 codes with a scale s and zero z per group of 64 are W = (q - z) s,
which is exactly ggml's Q4_1 (W = q d + m per block of 32) with d = s and m = -z s, the pair
repeated for both halves of a group.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from riverllm.engine.block import Projections
from riverllm.errors import RiverError
from riverllm.kernels.ggml import GGML_Q4_1, QuantMatrix
from riverllm.river.quant import QuantLinear

Q4_1_BLOCK = 32


class GGMLLinear(nn.Module):
    """y = x W^T + b, W held as ggml blocks. Activations of any float dtype; computes in float32
    (ggml quantizes them to 8 bits per block of 32 for the integer dot products).

    `fallback`: the same weights as a PyTorch module, for prompts (inputs [batch, new > 1, in]).
    ggml's products are matrix-vector kernels: over a whole prompt they are up to 3x slower than
    PyTorch's GEMMs on the dequantized weights (measured in docs/kernels.md). Decoding steps, lossless
    verification (one row per token) and batches of any size stay on ggml, so a row's result never
    depends on what it is batched with."""

    def __init__(self, matrix: QuantMatrix, bias: torch.Tensor | None, fallback: nn.Module | None = None):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.fallback = fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None and x.dim() == 3 and x.shape[1] > 1:
            return self.fallback(x)
        y = self.matrix.matmul(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        return self.matrix.blocks.nbytes

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, ggml_type={self.matrix.type}"


# GGUF tensor names of one decoder layer's projections (llama.cpp's), by Projections field.
# Phi3's fused gate_up is ffn_up in its GGUF.
GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"}


# The GGUF architectures whose tensor layout is checked against transformers' loading (the packaged
# SmolLM2 is llama, the Qwen2.5-Coder models qwen2; tests/test_ggml_kernels.py).
GGML_ARCHITECTURES = ("llama", "qwen2")


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each Llama q/k head (its rope pairs
    neighbours); transformers undoes it. The permutation moves whole rows, and a row of ggml blocks
    is a row of weights, so it undoes on the quantized bytes too."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, rows.shape[1]).swapaxes(1, 2).reshape(rows.shape)


def backbone_projections(gguf_path, engine, layers: nn.ModuleList) -> list[Projections]:
    """Every layer's backbone Projections from the GGUF's own quantized tensors. The biases and
    everything that is not a projection (norms, embeddings) stay the loaded model's."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    architecture = str(reader.fields["general.architecture"].contents())
    if architecture not in GGML_ARCHITECTURES:
        raise RiverError(f"the ggml kernels run {', '.join(GGML_ARCHITECTURES)} GGUF files so far, not "
                         f"'{architecture}' ({gguf_path.name}); use the torch kernels")
    config = engine.config
    result = []
    for index, layer in enumerate(layers):
        loaded = Projections.of(layer)
        modules = {}
        for field, stem in GGUF_NAMES.items():
            linear = getattr(loaded, field)
            if linear is None:
                modules[field] = None
                continue
            tensor = tensors.get(f"blk.{index}.{stem}.weight")
            if tensor is None:
                raise RiverError(f"{gguf_path.name} has no tensor blk.{index}.{stem}.weight")
            rows = np.asarray(tensor.data)
            if rows.dtype != np.uint8:  # F32/F16 matrices stay with PyTorch
                modules[field] = linear
                continue
            if architecture == "llama" and field in ("q", "k"):
                heads = config.num_attention_heads if field == "q" else config.num_key_value_heads
                rows = _unpermute_rows(rows, heads)
            matrix = QuantMatrix(np.ascontiguousarray(rows), int(tensor.tensor_type), linear.in_features)
            modules[field] = GGMLLinear(matrix, linear.bias, fallback=linear)
        result.append(Projections(**modules))
    return result


def q4_1_blocks(linear: QuantLinear) -> torch.Tensor:
    """A 4-bit QuantLinear's weights as ggml Q4_1 blocks (uint8 [out, in / 32 * 20])."""
    if linear.bits != 4 or linear.group_size % Q4_1_BLOCK or linear.backend != "int4_cpu":
        raise RiverError(f"only 4-bit twins on the CPU int4 kernel repack for ggml, not {linear.extra_repr()}")
    out_features, in_features = linear.out_features, linear.in_features
    codes = unpack_int4_cpu(linear.packed, out_features, in_features)
    # scales_and_zeros [in / group, out, 2] (bf16): W = (q - 8) scale + zero, so d = scale and
    # m = zero - 8 scale, as the int4 kernel itself computes them (in float32).
    scale = linear.scales_and_zeros[..., 0].float().t()
    offset = linear.scales_and_zeros[..., 1].float().t() - 8 * scale
    per_block = linear.group_size // Q4_1_BLOCK
    d = scale.repeat_interleave(per_block, dim=1).to(torch.float16)
    m = offset.repeat_interleave(per_block, dim=1).to(torch.float16)
    q = codes.reshape(out_features, -1, Q4_1_BLOCK).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)  # element j in the low nibble of byte j, j + 16 in the high
    blocks = torch.cat([d.view(torch.uint8).reshape(out_features, -1, 2), m.view(torch.uint8).reshape(out_features, -1, 2),
                        qs], dim=-1)
    return blocks.reshape(out_features, -1).contiguous()


def unpack_int4_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The codes q [out, in] behind `torch._convert_weight_to_int4pack_for_cpu(q, 2)`: per block of
    64 output rows, for each input column, 32 bytes whose low nibbles are rows 0..31 and high
    nibbles rows 32..63. The layout is torch's and undocumented, so the result is checked by
    packing it again."""
    if out_features % 64:
        raise RiverError(f"cannot repack an int4 layer with {out_features} output rows (not a multiple of 64)")
    grouped = packed.reshape(out_features // 64, in_features, 32)
    codes = torch.cat([grouped & 15, grouped >> 4], dim=2).permute(0, 2, 1).reshape(out_features, in_features)
    if not torch.equal(torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2), packed):
        raise RiverError("this torch packs int4 weights in a layout riverllm does not know; the ggml twins are off")
    return codes


def q4_1_linear(linear: nn.Module | None) -> nn.Module | None:
    """A 4-bit QuantLinear on ggml Q4_1; anything else (other bit widths, shapes the repacking does
    not take) as it is, on PyTorch's kernels."""
    if not isinstance(linear, QuantLinear) or linear.bits != 4 or linear.group_size % Q4_1_BLOCK \
            or linear.backend != "int4_cpu" or linear.out_features % 64:
        return linear
    return GGMLLinear(QuantMatrix(q4_1_blocks(linear).numpy(), GGML_Q4_1, linear.in_features), linear.bias,
                      fallback=linear)


def twin_projections(twins: list[Projections]) -> list[Projections]:
    """The river's twins with every 4-bit QuantLinear moved onto ggml Q4_1."""
    return [Projections(**{field: q4_1_linear(getattr(p, field)) for field in Projections.__dataclass_fields__})
            for p in twins]


def head_linear(gguf_path, hidden_size: int) -> GGMLLinear:
    """The LM head from the GGUF: `output.weight`, or the token embedding where the two are tied."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None or np.asarray(tensor.data).dtype != np.uint8:
        raise RiverError(f"{gguf_path.name} has no quantized LM head (output.weight or token_embd.weight)")
    return GGMLLinear(QuantMatrix(np.ascontiguousarray(tensor.data), int(tensor.tensor_type), hidden_size), None)


class GGMLKernels:
    """Everything a decoding step multiplies with, on ggml: the backbone's projections and the LM
    head as the GGUF stores them, and a converter that moves a river's twins onto Q4_1."""

    def __init__(self, gguf_path, engine):
        self.backbone = backbone_projections(gguf_path, engine, engine.layers)
        self.head = head_linear(gguf_path, engine.config.hidden_size)

    @staticmethod
    def twins(projections: list[Projections]) -> list[Projections]:
        return twin_projections(projections)
