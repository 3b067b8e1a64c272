"""The decoder block, owned: one attention + MLP block that runs with either of two weight sets.

riverllm does not call transformers' decoder-layer modules: their call signature (the cache
keyword, mask formats, what attention receives) changes between releases, and the early-exit
engine needs what they do not offer: K/V written at explicit per-row slots, and the rows of one
batch running different weights in the same layer. So, as gpt-fast owns its `model.py`, this file
owns the block. It reads its weights from the loaded transformers model (transformers stays for
loading, tokenizers, chat templates, and as the reference the tests compare against):

    h = h + o_proj(attention(rope(q_proj(norm1(h))), rope(k_proj(...)), v_proj(...)))
    h = h + down_proj(act(gate_proj(norm2(h))) * up_proj(norm2(h)))

with each family's variations, read off the layer itself: Qwen2's q/k/v bias (in the linear),
Qwen3's and Gemma3's per-head q/k RMSNorm, Gemma3's sandwich norms and query scale, Phi3's fused
qkv and gate_up projections and partial rotary embedding, Mistral's and Gemma3's sliding windows
(applied by the mask, see engine/step.py).

A River layer is this block with two weight sets (`Projections`): backbone layer j and its twin j
share the norms, the rotary embedding and the KV-cache slot; only the linear weights differ. In a
batch, the rows still in the backbone run the backbone's projections and the rows that left run
the twin's; attention is one call over all rows, so every row writes its K/V into the same cache.
A weight set that no row needs is not read.
"""

from __future__ import annotations

import time

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Projections:
    """The linear layers of one weight set of one decoder layer (nn.Linear or QuantLinear).
    Fused projections (Phi3) appear as `qkv` / `gate_up`, with the split ones left None."""

    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None
    o: nn.Module
    gate: nn.Module | None
    up: nn.Module | None
    gate_up: nn.Module | None
    down: nn.Module

    @classmethod
    def of(cls, layer: nn.Module) -> "Projections":
        """Read a transformers decoder layer's (or its twin's) linear layers."""
        attn, mlp = layer.self_attn, layer.mlp
        return cls(q=getattr(attn, "q_proj", None), k=getattr(attn, "k_proj", None), v=getattr(attn, "v_proj", None),
                   qkv=getattr(attn, "qkv_proj", None), o=attn.o_proj,
                   gate=getattr(mlp, "gate_proj", None), up=getattr(mlp, "up_proj", None),
                   gate_up=getattr(mlp, "gate_up_proj", None), down=mlp.down_proj)

    def modules(self) -> list[nn.Module]:
        """The projections that are there (the split or the fused ones)."""
        return [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]

    def map(self, function) -> "Projections":
        """The same projections, each one passed through `function` (None stays None)."""
        return Projections(**{f.name: None if getattr(self, f.name) is None else function(getattr(self, f.name))
                              for f in fields(self)})

    def fused(self) -> "Projections":
        """The same weights with q/k/v as one `qkv` and gate/up as one `gate_up` projection (their
        `Concat`): the layout of a layer whose other weight set is truly fused (the ggml kernels'
        backbone), since a layer's backbone and twin must have one layout."""
        if self.qkv is not None:  # already fused (Phi3)
            return self
        return replace(self, q=None, k=None, v=None, qkv=Concat(self.q, self.k, self.v),
                       gate=None, up=None, gate_up=Concat(self.gate, self.up))


class Concat(nn.Module):
    """Several linear layers over one input, their outputs side by side: a fused projection made
    of separate ones."""

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def weight_bytes(self) -> int:
        return sum(part.weight_bytes() if hasattr(part, "weight_bytes") else part.weight.nbytes for part in self.parts)


@dataclass(frozen=True)
class RowSplit:
    """Which rows of the batch run which weight set in one layer.

    `backbone` and `twin` are index tensors into the batch; `None` in both means "all rows run
    the backbone" and `twin_only` means all rows run the twin (the common, cheapest cases).
    `blend` (bool [n, 1, 1], True: backbone) is the fixed-shape form a CUDA graph can replay:
    both weight sets run on every row and each row keeps its own set's result (the weights are
    read once either way; only the arithmetic doubles, which batch-bound decoding can afford)."""

    backbone: torch.Tensor | None = None
    twin: torch.Tensor | None = None
    twin_only: bool = False
    blend: torch.Tensor | None = None
    rows: tuple[int, ...] = ()  # the backbone rows, on the host (what `backbone` holds on the device)

    @property
    def mixed(self) -> bool:
        return self.backbone is not None or self.blend is not None


ALL_BACKBONE = RowSplit()
ALL_TWIN = RowSplit(twin_only=True)


# CPU GEMMs give row r a result that depends on how many rows are multiplied with it:
# oneDNN/MKL pick a kernel by row count, each summing in its own order, and where the switches lie
# depends on the CPU (one thread: on the Intel AVX-512/AMX machine 2..15 rows share one blocking;
# on an AMD EPYC (AVX-512, no AMX) 2..3 rows do and 4 or more take another). The last bit differs,
# and a River exit threshold or a twin's bf16 cast can turn that bit into another token. bfloat16
# does it too (the AMD EPYC: a 4864-wide down projection gives one row other bits than 2 to 9
# rows, which all agree). So decoding multiplies float rows in groups whose size never changes a
# row's bits: `row_group` measures, once per weight shape, dtype and thread count on this CPU, the
# most rows (up to MAX_ROW_GROUP) that give every row exactly what it gets paired with a copy of
# itself; a single row is then paired with a copy of itself, unless it measured the same alone
# (packed bfloat16 on oneDNN, kernels/onednn.py: the head's one row costs 16.6 ms alone and 20.0
# paired). Where the CPU's matrix-vector kernel is much faster
# than its two-row GEMM (the AMD EPYC: MKL's small-row float32 GEMMs cost about one matrix-vector
# product per row there, so a paired row costs 2x), every row is multiplied alone instead (group
# 1): a row alone is the same call at any batch size. The int4 twin kernels are row-stable
# already (measured: docs/engine.md).
# 16: a server's default batch in one call (bfloat16 on the AMD EPYC: 2..16 rows all agree, and 16
# rows in one call cost ~1.4x one row against ~2.5x for two calls of 8).
MAX_ROW_GROUP = 16
ROW_GROUP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALONE_IF_PAIR_COSTS = 1.5  # a paired row must cost this many single rows before rows go alone


@dataclass(frozen=True)
class RowGroup:
    size: int  # rows per call (1: every row alone)
    alone_exact: bool = False  # a single row alone gets the bits it gets paired (so it need not be)


_row_groups: dict[tuple[type, int, int, int, torch.dtype], RowGroup] = {}


def _median_seconds(call, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def row_group(linear: nn.Linear) -> RowGroup:
    """How many rows one call of `linear` takes on this CPU with every row's result unchanged by
    the batch size: 1 (each row alone) or 2..MAX_ROW_GROUP, and whether a lone row may go alone;
    measured on the first call for its shape, dtype and thread count."""
    dtype = linear.weight.dtype
    # per kernel too: a PackedLinear (kernels/onednn.py) is an nn.Linear on another code path
    key = (type(linear), linear.out_features, linear.in_features, torch.get_num_threads(), dtype)
    if key not in _row_groups:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(MAX_ROW_GROUP, 1, linear.in_features, generator=generator).to(dtype)
        with torch.no_grad():  # the very calls decoding makes, bias included
            linear(probe[:2])  # warm both kernels up before timing them
            alone, paired = (_median_seconds(lambda: linear(probe[:1])), _median_seconds(lambda: linear(probe[:2])))
            if paired > ALONE_IF_PAIR_COSTS * alone:
                group = RowGroup(1)
            else:
                paired_rows = torch.cat([linear(torch.cat([row, row]))[:1] for row in probe.split(1)])  # [16, 1, out]
                size = 2
                while size < MAX_ROW_GROUP and torch.equal(linear(probe[:size + 1]), paired_rows[:size + 1]):
                    size += 1
                group = RowGroup(size, torch.equal(torch.cat([linear(row) for row in probe.split(1)]), paired_rows))
        _row_groups[key] = group
    return _row_groups[key]


def stable_rows(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for decoding inputs x [n, 1, in], row results independent of n."""
    if not (isinstance(linear, nn.Linear) and linear.weight.dtype in ROW_GROUP_DTYPES
            and linear.weight.device.type == "cpu" and x.shape[1] == 1):
        return linear(x)
    measured = row_group(linear)
    if measured.size == 1:
        return linear(x) if x.shape[0] == 1 else torch.cat([linear(row) for row in x.split(1)])
    outputs = []
    for start in range(0, x.shape[0], measured.size):
        group = x[start:start + measured.size]
        if group.shape[0] == 1 and not measured.alone_exact:
            outputs.append(linear(torch.cat([group, group]))[:1])
        else:
            outputs.append(linear(group))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def project(x: torch.Tensor, split: RowSplit, backbone: nn.Module | None, twin: nn.Module | None) -> torch.Tensor:
    """backbone(x) for the backbone rows, twin(x) for the others: each weight set is read once,
    and only when some row needs it."""
    if not split.mixed:
        return twin(x) if split.twin_only else stable_rows(backbone, x)
    if split.blend is not None:
        full = backbone(x)
        return torch.where(split.blend, full, twin(x).to(full.dtype))
    first = stable_rows(backbone, x[split.backbone])
    out = first.new_empty(x.shape[0], *first.shape[1:])
    out[split.backbone] = first
    out[split.twin] = twin(x[split.twin]).to(first.dtype)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, new, head_dim]; cos/sin [batch, new, rotary_dim] (rotary_dim <= head_dim:
    Phi3 rotates only the first part of each head)."""
    cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


def attention_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What attention computes in for weights of `dtype` on `device`: float32 on a CPU (see
    `DecoderBlock.attend`), the weights' own dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else dtype


class DecoderBlock:
    """Decoder layer `index` of the model: its shared parts (norms, head geometry, scaling) and the
    attention + MLP computation. The weight sets are passed in per call."""

    def __init__(self, layer: nn.Module, config, index: int):
        attn = layer.self_attn
        self.index = index
        self.input_norm = layer.input_layernorm
        # Llama layout: post_attention_layernorm is the MLP's input norm. Gemma3 (sandwich norms):
        # it normalises the attention output, and pre/post_feedforward_layernorm wrap the MLP.
        self.sandwich = hasattr(layer, "pre_feedforward_layernorm")
        if self.sandwich:
            self.attn_out_norm = layer.post_attention_layernorm
            self.mlp_norm = layer.pre_feedforward_layernorm
            self.mlp_out_norm = layer.post_feedforward_layernorm
        else:
            self.attn_out_norm = self.mlp_out_norm = None
            self.mlp_norm = layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.act = getattr(layer.mlp, "act_fn", None) or layer.mlp.activation_fn  # Phi3 names it so
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = float(attn.scaling)
        if getattr(attn, "attn_logit_softcapping", None):
            raise NotImplementedError("attention logit soft-capping (Gemma2) is not supported")

    # --- the pieces -------------------------------------------------------------------------------

    def qkv(self, hidden: torch.Tensor, split: RowSplit, backbone: Projections | None, twin: Projections | None,
            cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input -> q [b, heads, new, d], k and v [b, kv_heads, new, d], RoPE applied."""
        batch, new, _ = hidden.shape
        x = self.input_norm(hidden)
        any_set = backbone or twin
        if any_set.qkv is not None:
            fused = project(x, split, backbone and backbone.qkv, twin and twin.qkv)
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = fused[..., :q_size], fused[..., q_size:q_size + kv_size], fused[..., q_size + kv_size:]
        else:
            q = project(x, split, backbone and backbone.q, twin and twin.q)
            k = project(x, split, backbone and backbone.k, twin and twin.k)
            v = project(x, split, backbone and backbone.v, twin and twin.v)
        q = q.view(batch, new, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, new, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, new, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """sdpa over the visible K/V. mask: bool [b, 1, new, visible] (True: may attend), or None
        where plain (causal) attention is exact. Grouped K/V heads: sdpa's own GQA without a mask,
        expanded heads with one (as transformers does, for the same kernels and numbers).

        On a CPU, attention runs in float32 whatever the weights' dtype (`attention_dtype`):
        torch's CPU attention kernel in bfloat16 (no AMX) is 4-6x slower than in float32 for one
        query (one thread, 9 heads over 150 keys: 140 us vs 35 us with the casts), and attention
        is a third of a 16-row decoding step in bfloat16 (one call per row length). Each row's
        call is the same alone or batched, so rows stay batch-invariant."""
        out_dtype, compute = q.dtype, attention_dtype(q.device, q.dtype)
        if compute != out_dtype:
            q, keys, values = q.to(compute), keys.to(compute), values.to(compute)
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=self.scaling,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            groups = self.num_heads // self.num_kv_heads
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        batch, _, new, _ = q.shape
        return out.to(out_dtype).transpose(1, 2).reshape(batch, new, -1)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor, split: RowSplit, backbone: Projections | None,
               twin: Projections | None) -> torch.Tensor:
        """Output projection, residual, MLP, residual."""
        out = project(attn_out, split, backbone and backbone.o, twin and twin.o)
        if self.attn_out_norm is not None:
            out = self.attn_out_norm(out)
        hidden = hidden + out
        x = self.mlp_norm(hidden)
        any_set = backbone or twin
        if any_set.gate_up is not None:
            gate, up = project(x, split, backbone and backbone.gate_up, twin and twin.gate_up).chunk(2, dim=-1)
        else:
            gate = project(x, split, backbone and backbone.gate, twin and twin.gate)
            up = project(x, split, backbone and backbone.up, twin and twin.up)
        out = project(self.act(gate) * up, split, backbone and backbone.down, twin and twin.down)
        if self.mlp_out_norm is not None:
            out = self.mlp_out_norm(out)
        return hidden + out

    def kv_only(self, hidden: torch.Tensor, weights: Projections, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V projections of `hidden` (CALM's propagation; no attention, no MLP)."""
        _, k, v = self.qkv(hidden, ALL_BACKBONE, weights, None, cos, sin)
        return k, v
