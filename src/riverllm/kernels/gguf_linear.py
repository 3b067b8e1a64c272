"""Linear layers that compute with ggml on quantized blocks: the GGUF backbone and LM head as stored.

`backbone_projections(gguf_path, engine)` reads each decoder layer's projection matrices straight
from the GGUF file (memory-mapped, never dequantized) and returns the engine's `Projections` with
`GGMLLinear` modules in place of the dequantized `nn.Linear`s; `head_linear` does the same for the
LM head.

Each of them is wrapped in a `PromptSplit` (prompts.py): prompts run on a bfloat16 copy of the
same weights, decoding steps on ggml.

The river's 4-bit twins stay on PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`). Their HQQ
codes repack exactly as ggml Q4_1 (d = s, m = -z s), and an earlier version did that, but measured
on the 0.5B Qwen (docs/kernels.md) Q4_1 lost everywhere: a 151,936-row 4-bit head took 15.3 ms per
token on Q4_1 and 10.7 ms on the int4 kernel, 105 vs 60 ms at 16 rows, and river:0.9 decoded at
13.8 tok/s with Q4_1 twins against 17.2 with int4 ones (batch 16: 41.8 vs 57.1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from riverllm.engine.block import Concat, Projections
from riverllm.errors import RiverError
from riverllm.kernels.ggml import QuantBlocks, QuantMatrix
from riverllm.kernels.prompts import PromptSplit, prompt_copy, with_prompt_copy


class GGMLLinear(nn.Module):
    """y = x W^T + b, W held as ggml blocks. Activations of any float dtype; computes in float32
    (ggml quantizes them to 8 bits per block of 32 for the integer dot products). ggml's products
    are matrix-vector kernels, for decoding steps: the backbone's are wrapped so that prompts take
    a PyTorch copy instead (prompts.py)."""

    def __init__(self, matrix: QuantMatrix, bias: torch.Tensor | None):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix.matmul(x.reshape(-1, self.in_features))  # ggml's float32 input buffer converts
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        return self.matrix.nbytes

    def extra_repr(self) -> str:
        types = ",".join(str(part.type) for part in self.matrix.parts)
        return f"{self.in_features}, {self.out_features}, ggml_type={types}"


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
    """Every layer's backbone Projections from the GGUF's own quantized tensors, q/k/v and gate/up
    fused: each group is one ggml graph, so a decoding step makes 3 calls
    into ggml per layer instead of 7. The biases and everything that is not a projection (norms,
    embeddings) stay the loaded model's."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    architecture = str(reader.fields["general.architecture"].contents())
    if architecture not in GGML_ARCHITECTURES:
        raise RiverError(f"the ggml kernels run {', '.join(GGML_ARCHITECTURES)} GGUF files so far, not "
                         f"'{architecture}' ({gguf_path.name}); use the torch kernels")
    config = engine.config

    def blocks(index: int, field: str, linear: nn.Linear) -> QuantBlocks | None:
        """The GGUF's blocks of one projection; None for a matrix stored unquantized (F32/F16),
        which stays with PyTorch."""
        name = f"blk.{index}.{GGUF_NAMES[field]}.weight"
        tensor = tensors.get(name)
        if tensor is None:
            raise RiverError(f"{gguf_path.name} has no tensor {name}")
        rows = np.asarray(tensor.data)
        if rows.dtype != np.uint8:
            return None
        if architecture == "llama" and field in ("q", "k"):
            heads = config.num_attention_heads if field == "q" else config.num_key_value_heads
            rows = _unpermute_rows(rows, heads)
        return QuantBlocks(np.ascontiguousarray(rows), int(tensor.tensor_type), linear.in_features)

    def product(index: int, fields: tuple[str, ...], linears: list[nn.Linear]) -> nn.Module:
        """One module for `linears` (their outputs side by side): a ggml product over their
        blocks with a bfloat16 copy of each for prompts, or PyTorch's where one is unquantized."""
        parts = [blocks(index, field, linear) for field, linear in zip(fields, linears)]
        if any(part is None for part in parts):
            return linears[0] if len(linears) == 1 else Concat(*linears)
        biases = [linear.bias for linear in linears]
        if all(bias is None for bias in biases):
            bias = None
        else:
            bias = torch.cat([torch.zeros(linear.out_features) if linear.bias is None else linear.bias.detach().float()
                              for linear in linears])
        prompt = prompt_copy(linears[0]) if len(linears) == 1 else Concat(*map(prompt_copy, linears))
        return PromptSplit(GGMLLinear(QuantMatrix(parts), bias), prompt)

    result = []
    for index, layer in enumerate(layers):
        loaded = Projections.of(layer)
        if loaded.qkv is not None:
            raise RiverError(f"the ggml kernels do not run fused q/k/v layers yet ({gguf_path.name})")
        result.append(Projections(q=None, k=None, v=None, gate=None, up=None,
                                  qkv=product(index, ("q", "k", "v"), [loaded.q, loaded.k, loaded.v]),
                                  o=product(index, ("o",), [loaded.o]),
                                  gate_up=product(index, ("gate", "up"), [loaded.gate, loaded.up]),
                                  down=product(index, ("down",), [loaded.down])))
    return result


def head_linear(gguf_path, hidden_size: int) -> GGMLLinear:
    """The LM head from the GGUF: `output.weight`, or the token embedding where the two are tied."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None or np.asarray(tensor.data).dtype != np.uint8:
        raise RiverError(f"{gguf_path.name} has no quantized LM head (output.weight or token_embd.weight)")
    return GGMLLinear(QuantMatrix.of(np.ascontiguousarray(tensor.data), int(tensor.tensor_type), hidden_size), None)


class GGMLKernels:
    """What a step multiplies with under `--kernels ggml`: the backbone's projections and the LM
    head as the GGUF stores them, on ggml; the twins on their int4 modules for decoding and on
    bfloat16 copies for prompts (`twins`, built the first time a river is used)."""

    def __init__(self, gguf_path, engine):
        self.backbone = backbone_projections(gguf_path, engine, engine.layers)
        self.head = head_linear(gguf_path, engine.config.hidden_size)
        self._twins: dict[int, tuple[nn.ModuleList, list[Projections]]] = {}

    def twins(self, river: nn.ModuleList) -> list[Projections]:
        entry = self._twins.get(id(river))
        if entry is None or entry[0] is not river:
            # fused like the backbone (a River layer's two weight sets must have one layout)
            projections = [Projections.of(twin).map(with_prompt_copy).fused() for twin in river]
            entry = self._twins[id(river)] = (river, projections)
        return entry[1]
