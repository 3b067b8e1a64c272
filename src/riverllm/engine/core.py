"""One forward step of the model with early exit, per row: embeddings, decoder blocks, final norm,
LM head, with River-LLM's exit rule after every backbone block.

A step feeds `new` tokens to each of `n` rows of a `KVCache` (a prompt in prefill, one token per
row in decoding, a block of tokens in teacher forcing). Each row keeps its own depth:

- a row runs backbone block j while j < its depth, and twin j after it (the river);
- after backbone block l the rule looks at s_l = cos(h_{l-1}, h_l) (fp32) of the row's tokens
  (the minimum over a prompt: one depth per prompt) and the row leaves when s_l > tau;
- at block j, rows still in the backbone run its full-precision weights and rows that left run
  the twin's (engine/block.py); attention is one call, and every row writes K/V into slot j.

So a row's tokens and exit layers are those it gets alone, whatever its neighbours do (up to the
floating-point reduction order of batched kernels: docs/engine.md measures how far that goes).
The paper's rule, where the whole batch leaves at its least settled row, is `exit_rule="batch-min"`.

The prior strategies of filling the KV hole (SPEC.md section 1; `policy.kv_strategy`) run here
too, with the batch-min rule (EE-LLM and CALM decide per batch): "recompute" (EE-LLM: an exited
token's skipped blocks run later, batched with the next token deep enough), "propagate" (CALM:
the exit state's K/V projections fill the skipped blocks), "mask" (D-LLM: nothing is written,
later tokens do not attend to the hole); SkipDecode is "mask" with a depth schedule. They read the
LM head at the exit layer.

The exit loop lives here once. The CUDA-graph runner (engine/cuda_graphs.py) subclasses this
engine and replaces only `run_layer` and `head` with replayed graphs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from riverllm.engine.block import (ALL_BACKBONE, ALL_TWIN, DecoderBlock, Projections, RowSplit, attention_dtype,
                                   stable_rows)
from riverllm.engine.cache import KVCache, PendingTokens
from riverllm.policy import ExitPolicy
from riverllm.river.quant import QuantLinear


@dataclass
class StepOutput:
    logits: torch.Tensor  # [n, vocab] at each row's last token, or [n, new, vocab] with all_logits
    exit_layers: list[int]  # per row: backbone layers run (L: never left)
    similarities: list[torch.Tensor] = field(default_factory=list)  # per backbone layer run: [n, new]

    @property
    def exit_layer(self) -> int:
        """The deepest row's exit layer (the only one at batch 1)."""
        return max(self.exit_layers)


@dataclass
class StepContext:
    """Where a step's tokens go and what they may see; built once per step (engine.context)."""

    rows: torch.Tensor | None  # cache rows of the batch (None: rows 0..n-1, all of them)
    row_list: list[int]
    slots: torch.Tensor  # [n, new] cache slot (= position) of each token
    counts: list[int]  # real tokens per row (the rest of `new` is right padding)
    start: int | None  # the common first slot, when every row starts there (fast writes)
    visible: int  # attention reads slots 0..visible-1
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer type: cos, sin [n, new, rot]
    masks: dict[str, torch.Tensor | None]  # per layer type: bool [n, 1, new, visible] or None
    causal: bool  # with mask None: is_causal (a prompt from slot 0) or not (one new token)
    # Decoding rows of different lengths attend in groups of equal length, each group over
    # exactly its own slots, as it would alone (see `context`); None: one call for all rows.
    groups: list["AttentionGroup"] | None = None


@dataclass
class AttentionGroup:
    positions: torch.Tensor | slice  # the group's rows, as positions in the batch
    cache_rows: torch.Tensor | slice  # ... and as cache rows
    visible: int
    masks: dict[str, torch.Tensor | None]


class RiverEngine:
    def __init__(self, model: nn.Module):
        self.model = model
        decoder = model.model
        self.config = config = model.config
        self.embed_tokens = decoder.embed_tokens
        self.layers: nn.ModuleList = decoder.layers
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = model.lm_head
        # What `head` multiplies with: the model's own module, unless `use_kernels` moved it onto
        # other kernels (riverllm.kernels: ggml on quantized blocks).
        self.head_linear: nn.Module = model.lm_head
        self.num_layers = len(self.layers)
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.layer_types = self._layer_types()
        self.sliding_window = getattr(config, "sliding_window", None)
        self._rope_by_layer_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        self.blocks = [DecoderBlock(layer, config, index) for index, layer in enumerate(self.layers)]
        # None where a backbone layer was freed (`RiverLM.free_backbone`): tokens must leave before.
        self.backbone: list[Projections | None] = [Projections.of(layer) for layer in self.layers]
        first = self.blocks[0]
        self.kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self._twins: dict[int, tuple[nn.ModuleList, list[Projections]]] = {}
        self.twin_kernels: Callable[[nn.ModuleList], list[Projections]] | None = None  # see use_kernels

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        # Mistral-style configs: one sliding window for every layer when it is set.
        sliding = getattr(self.config, "sliding_window", None) and getattr(self.config, "use_sliding_window", True)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def attention_dtype(self) -> torch.dtype:
        """What attention computes in (`DecoderBlock.attend`): float32 on a CPU, else the weights' dtype."""
        return attention_dtype(self.device, self.dtype)

    @property
    def resident_layers(self) -> int:
        """Backbone layers still in memory (all of them unless `free_backbone` ran)."""
        return next((j for j, weights in enumerate(self.backbone) if weights is None), self.num_layers)

    def free_layers(self, keep: int) -> None:
        """Forget backbone weights of layers keep.. (the caller drops the modules themselves)."""
        for index in range(keep, self.num_layers):
            self.backbone[index] = None

    def new_cache(self, rows: int, max_len: int, track_filled: bool = False) -> KVCache:
        return KVCache(self.num_layers, rows, max_len, self.kv_heads, self.head_dim, self.device, self.dtype,
                       track_filled)

    def twins(self, river: nn.ModuleList) -> list[Projections]:
        if self.twin_kernels is not None:
            return self.twin_kernels(river)
        entry = self._twins.get(id(river))
        if entry is None or entry[0] is not river:
            projections = [Projections.of(twin).map(kept_or_quantized) for twin in river]
            entry = self._twins[id(river)] = (river, projections)
        return entry[1]

    def use_kernels(self, backbone: list[Projections | None], head: nn.Module,
                    twins: Callable[[nn.ModuleList], list[Projections]] | None = None) -> None:
        """Swap the backbone and head modules the step multiplies with (same weights, other
        kernels), and with `twins` what a river's twins multiply with (default: their own
        modules). Freed backbone layers stay freed."""
        self.backbone = [None if old is None else new for old, new in zip(self.backbone, backbone)]
        self.head_linear = head
        self.twin_kernels = twins

    # --- what a step sees -------------------------------------------------------------------------

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._rope_by_layer_type:
            return {t: self.rotary_emb(hidden, positions, t) for t in set(self.layer_types)}
        shared = self.rotary_emb(hidden, positions)
        return {t: shared for t in set(self.layer_types)}

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None

    @staticmethod
    def allowed_keys(slots: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
        """THE mask rule: token at slot q may attend to slot k when k <= q and, for a sliding
        layer, q - k < window. slots [n, new], keys [visible] -> bool [n, 1, new, visible]."""
        allowed = keys[None, None, :] <= slots[:, :, None]
        if window is not None:
            allowed = allowed & (slots[:, :, None] - keys[None, None, :] < window)
        return allowed[:, None]

    def context(self, cache: KVCache, hidden: torch.Tensor, rows: list[int] | None, counts: list[int] | None,
                force_masks: bool = False) -> StepContext:
        """Slots, masks and rotary embeddings of a step (once per step, shared by all blocks)."""
        n, new = hidden.shape[:2]
        row_list = list(range(n)) if rows is None else list(rows)
        # A cache row listed m times feeds m consecutive tokens, one per listing (each listing its
        # own batch row): lossless decoding verifies a block of drafts so, every token through the
        # very kernels it runs when decoded alone (engine/lossless.py).
        starts, taken = [], {}
        for r in row_list:
            starts.append(cache.lengths[r] + taken.get(r, 0))
            taken[r] = taken.get(r, 0) + new
        if new > 1 and len(taken) < len(row_list):
            raise ValueError("a cache row may be listed more than once only for one token per listing")
        visible = max(starts) + new
        if visible > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} slots per row; this step needs {visible}")
        same_start = all(s == starts[0] for s in starts)
        device = hidden.device
        slots = torch.tensor(starts, device=device)[:, None] + torch.arange(new, device=device)[None, :]
        # Plain attention is exact for a prompt from slot 0 (causal; right padding sits after every
        # real token) and for one new token per row at a common slot (it sees every key so far).
        plain = not force_masks and same_start and (starts[0] == 0 or new == 1)
        masks = self.masks_for(slots, visible, plain)
        groups = None
        if not same_start and new == 1 and not force_masks:
            # Padding a row's keys to the longest row's length changes the order of its softmax
            # sums (the last bit of its output); grouping rows by length keeps each row's
            # attention the very call it makes alone.
            cache_rows = torch.tensor(row_list, device=device)
            groups = []
            for start in sorted(set(starts)):
                members = [i for i, s in enumerate(starts) if s == start]
                index = torch.tensor(members, device=device)
                if len(members) == 1:  # slices: views, where an index tensor would gather copies
                    i = members[0]
                    positions, rows_of_group = slice(i, i + 1), slice(row_list[i], row_list[i] + 1)
                else:
                    positions, rows_of_group = index, cache_rows[index]
                groups.append(AttentionGroup(positions, rows_of_group, start + 1,
                                             self.masks_for(slots[index], start + 1, plain=True)))
        return StepContext(
            rows=None if rows is None else torch.tensor(row_list, device=device), row_list=row_list, slots=slots,
            counts=list(counts) if counts is not None else [new] * n, start=starts[0] if same_start else None,
            visible=visible, rope=self.rotary(hidden, slots), masks=masks, causal=new > 1, groups=groups)

    def masks_for(self, slots: torch.Tensor, visible: int, plain: bool) -> dict[str, torch.Tensor | None]:
        """Per layer type: None where plain attention is exact (and no window cuts in), else the
        rule's mask over slots 0..visible-1."""
        masks = {}
        for layer_type in set(self.layer_types):
            window = self.window(layer_type)
            if plain and (window is None or visible <= window):
                masks[layer_type] = None
            else:
                masks[layer_type] = self.allowed_keys(slots, torch.arange(visible, device=slots.device), window)
        return masks

    # --- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        policy: ExitPolicy,
        river: nn.ModuleList | None = None,
        rows: list[int] | None = None,
        counts: list[int] | None = None,
        deciding: list[bool] | None = None,
        all_logits: bool = False,
        record_similarities: bool = False,
        lm_head: nn.Module | None = None,
    ) -> StepOutput:
        """Run `input_ids` [n, new] for cache rows `rows` (None: all rows, n == cache.rows), each
        row's tokens at its next slots; then advance the rows' lengths by `counts` (real tokens per
        row; default new). deciding[r] False: row r (finished, kept only for its shape) does not
        hold the batch back under the batch-min rule. lm_head: a replacement for the model's LM
        head (a low-bit copy: `riverllm.river.low_bit_head`)."""
        n, new = input_ids.shape
        strategy = policy.kv_strategy
        prior = strategy != "river"
        holes = prior and cache.filled is not None and (cache.has_holes or strategy == "recompute")
        hidden, ctx = self.embed(input_ids, cache, rows, counts, force_masks=holes)
        valid = None
        if any(c != new for c in ctx.counts):
            valid = torch.arange(new, device=hidden.device)[None, :] < torch.tensor(ctx.counts, device=hidden.device)[:, None]
        batch_min = prior or policy.exit_rule == "batch-min"
        deciding = deciding or [True] * n
        twins = self.twins(river) if river is not None else None

        forced = policy.start_layer()
        if policy.depth_schedule is not None:
            row = ctx.row_list[0]
            forced = policy.scheduled_depth(cache.lengths[row] - cache.prompt_lengths[row], self.num_layers)
        depth = [self.num_layers if forced is None else forced] * n  # each row's backbone runs to this layer
        twin_layers = policy.twin_layers(self.num_layers)  # a static mix: twins first, for every row
        similarities: list[torch.Tensor] = []
        exit_hidden = hidden  # priors: the state after the last backbone block
        for index in range(self.num_layers):
            in_backbone = [r for r in range(n) if twin_layers <= index < depth[r]]
            if in_backbone and self.backbone[index] is None:
                raise RuntimeError(f"backbone layer {index + 1} was freed; set max_backbone_layers <= {index}")
            rule = policy.rule_at(index + 1) if in_backbone else "stay"
            cosine = bool(in_backbone) and (rule == "compare" or record_similarities)
            if not prior:
                split = self.split(in_backbone, n, hidden.device)
                if split is not ALL_BACKBONE and twins is None:
                    raise RuntimeError("this step exits early but no river was given")
                output = self.run_layer(index, hidden, ctx, cache, split, twins, cosine)
            elif in_backbone:  # priors decide per batch: all rows are in, or none
                output = self._prior_layer(index, hidden, ctx, cache, policy)
            else:
                if strategy == "propagate":
                    self._propagate(index, exit_hidden, ctx, cache)
                    continue
                break  # recompute / mask / SkipDecode: the skipped blocks write nothing now
            if rule == "leave":
                for r in in_backbone:
                    depth[r] = index + 1
            elif cosine:
                similarity = self.similarity(index, hidden, output)  # [n, new]
                if record_similarities:
                    similarities.append(similarity)
                if rule == "compare":
                    self._decide(index + 1, similarity, depth, in_backbone, deciding, valid, policy, batch_min)
            hidden = output
            if prior:
                exit_hidden = hidden

        if prior and depth[0] < self.num_layers:
            cache.has_holes = cache.has_holes or strategy != "propagate"
            if strategy == "recompute":
                cache.pending.append(PendingTokens(ctx.slots, exit_hidden, depth[0]))
        for r, row in enumerate(ctx.row_list):
            cache.lengths[row] += ctx.counts[r]
        logits = self.final_logits(exit_hidden if prior else hidden, ctx, all_logits, lm_head)
        return StepOutput(logits, [d - twin_layers for d in depth], similarities)  # backbone layers run

    def prefill(self, prompts: list[list[int]], cache: KVCache, policy: ExitPolicy,
                river: nn.ModuleList | None = None, rows: list[int] | None = None,
                lm_head: nn.Module | None = None) -> StepOutput:
        """Each prompt into its own cache row (rows[i], default i), one prompt per forward.

        One at a time on purpose: a prompt then runs exactly the kernels it runs alone (batched,
        the matrix shapes change with the other prompts, and so does the last bit of the sums,
        which an exit threshold or a bf16 cast can turn into another token). Prefill is paid once
        per request; the decoding steps are where batching pays."""
        rows = list(range(len(prompts))) if rows is None else rows
        outputs = [self.forward(torch.tensor([prompt], device=self.device), cache, policy, river, rows=[row],
                                lm_head=lm_head)
                   for prompt, row in zip(prompts, rows)]
        return StepOutput(torch.cat([o.logits for o in outputs]), [o.exit_layers[0] for o in outputs])

    # --- the parts of a step a runner may replace (engine/cuda_graphs.py) -------------------------

    def embed(self, input_ids: torch.Tensor, cache: KVCache, rows: list[int] | None, counts: list[int] | None,
              force_masks: bool) -> tuple[torch.Tensor, StepContext]:
        hidden = self.embed_tokens(input_ids)
        return hidden, self.context(cache, hidden, rows, counts, force_masks)

    def similarity(self, index: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """s_l of every token: the cosine of block `index`'s input and output, in fp32."""
        return F.cosine_similarity(before.float(), after.float(), dim=-1)

    def final_logits(self, final: torch.Tensor, ctx: StepContext, all_logits: bool,
                     lm_head: nn.Module | None = None) -> torch.Tensor:
        """Logits at each row's last real token [n, vocab], or at every token [n, new, vocab]."""
        if all_logits:
            return self.head(final, lm_head)
        n = final.shape[0]
        if any(c != final.shape[1] for c in ctx.counts):
            last = torch.tensor([c - 1 for c in ctx.counts], device=final.device)
            return self.head(final[torch.arange(n, device=final.device), last][:, None], lm_head)[:, 0]
        return self.head(final[:, -1:], lm_head)[:, 0]

    @staticmethod
    def split(in_backbone: list[int], n: int, device: torch.device) -> RowSplit:
        if len(in_backbone) == n:
            return ALL_BACKBONE
        if not in_backbone:
            return ALL_TWIN
        others = [r for r in range(n) if r not in set(in_backbone)]
        return RowSplit(torch.tensor(in_backbone, device=device), torch.tensor(others, device=device),
                        rows=tuple(in_backbone))

    def _decide(self, layer: int, similarity: torch.Tensor, depth: list[int], in_backbone: list[int],
                deciding: list[bool], valid: torch.Tensor | None, policy: ExitPolicy, batch_min: bool) -> None:
        """The exit rule after backbone block `layer` (1-based): rows whose tokens' similarity
        passes tau leave (`depth` = layer). One host read."""
        if valid is not None:
            similarity = similarity.masked_fill(~valid, float("inf"))
        per_row = similarity.amin(dim=-1)  # one depth per prompt: its least settled token
        if batch_min:
            staying = set(in_backbone)
            counted = torch.tensor([r in staying and deciding[r] for r in range(len(depth))], device=per_row.device)
            if policy.leaves(per_row.masked_fill(~counted, float("inf")).min().item(), layer):
                for r in in_backbone:
                    depth[r] = layer
            return
        leaves = policy.leaves(per_row, layer).tolist()
        for r in in_backbone:
            if leaves[r]:
                depth[r] = layer

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: StepContext, cache: KVCache, split: RowSplit,
                  twins: list[Projections] | None, cosine: bool = False) -> torch.Tensor:
        """Block `index` for every row of the step, each row with its weight set (see `split`).
        cosine: the loop will ask `similarity` for this block (a graph runner computes it inside)."""
        block = self.blocks[index]
        layer_type = self.layer_types[index]
        backbone = None if split.twin_only else self.backbone[index]
        twin = twins[index] if (split.twin_only or split.mixed) else None
        cos, sin = ctx.rope[layer_type]
        q, k, v = block.qkv(hidden, split, backbone, twin, cos, sin)
        cache.write(index, k, v, ctx.rows, ctx.slots, ctx.start)
        if ctx.groups is None:
            keys, values = cache.read(index, ctx.rows, ctx.visible)
            mask = ctx.masks[layer_type]
            attn = block.attend(q, keys, values, mask, ctx.causal and mask is None)
        else:
            attn = q.new_empty(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
            for group in ctx.groups:
                keys, values = cache.read(index, group.cache_rows, group.visible)
                mask = group.masks[layer_type]
                attn[group.positions] = block.attend(q[group.positions], keys, values, mask, False)
        return block.finish(hidden, attn, split, backbone, twin)

    def head(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Final norm + LM head (+ Gemma's soft-cap) of any hidden states."""
        logits = stable_rows(self.head_linear if lm_head is None else lm_head, self.norm(hidden))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    # --- the prior strategies ---------------------------------------------------------------------

    def _hole_mask(self, index: int, ctx: StepContext, cache: KVCache, slots: torch.Tensor) -> torch.Tensor | None:
        """The mask rule restricted to the slots layer `index` holds K/V for."""
        if cache.filled is None or not cache.has_holes and not cache.pending:
            return None
        allowed = self.allowed_keys(slots, torch.arange(ctx.visible, device=slots.device),
                                    self.window(self.layer_types[index]))
        held = cache.filled[index][:, :ctx.visible] if ctx.rows is None else cache.filled[index][ctx.rows, :ctx.visible]
        return allowed & held[:, None, None, :]

    def _prior_layer(self, index: int, hidden: torch.Tensor, ctx: StepContext, cache: KVCache,
                     policy: ExitPolicy) -> torch.Tensor:
        owed = [p for p in cache.pending if p.next_layer == index] if policy.kv_strategy == "recompute" else []
        if not owed:
            # Written first, so that the mask sees this step's own slots as held.
            return self._layer_with_holes(index, hidden, ctx, cache, ctx.slots)
        # EE-LLM: tokens that owe this block run it now, batched ahead of the new tokens.
        slots = torch.cat([p.slots for p in owed] + [ctx.slots], dim=1)
        states = torch.cat([p.hidden for p in owed] + [hidden], dim=1)
        sub = StepContext(ctx.rows, ctx.row_list, slots, ctx.counts, None, ctx.visible, self.rotary(states, slots),
                          ctx.masks, False)
        output = self._layer_with_holes(index, states, sub, cache, slots)
        start = 0
        for pending in owed:
            count = pending.slots.shape[1]
            pending.hidden, pending.next_layer = output[:, start:start + count], index + 1
            start += count
        cache.pending = [p for p in cache.pending if p.next_layer < self.num_layers]
        return output[:, start:]

    def _layer_with_holes(self, index: int, hidden: torch.Tensor, ctx: StepContext, cache: KVCache,
                          slots: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        backbone = self.backbone[index]
        cos, sin = ctx.rope[self.layer_types[index]]
        q, k, v = block.qkv(hidden, ALL_BACKBONE, backbone, None, cos, sin)
        cache.write(index, k, v, ctx.rows, slots, None)
        keys, values = cache.read(index, ctx.rows, ctx.visible)
        mask = self._hole_mask(index, ctx, cache, slots)
        if mask is None:
            mask = ctx.masks[self.layer_types[index]]
        attn = block.attend(q, keys, values, mask, ctx.causal and mask is None)
        return block.finish(hidden, attn, ALL_BACKBONE, backbone, None)

    def _propagate(self, index: int, exit_hidden: torch.Tensor, ctx: StepContext, cache: KVCache) -> None:
        """CALM: block `index`'s K/V projections of the exit state fill the slot it skipped."""
        cos, sin = ctx.rope[self.layer_types[index]]
        k, v = self.blocks[index].kv_only(exit_hidden, self.backbone[index], cos, sin)
        cache.write(index, k, v, ctx.rows, ctx.slots, ctx.start)


def kept_or_quantized(twin: nn.Module) -> nn.Module:
    """A twin projection as the step multiplies it: a twin whose weight is kept dequantized
    (`QuantLinear.keep_dequantized`: no int4 kernel for its bit width) as a plain nn.Linear, so that
    it goes through the row-stable groups like a backbone layer (a whole batch in one float GEMM
    would give a row other bits than alone); int4 twins as they are (their kernel is row-stable)."""
    kept = twin.kept_linear() if isinstance(twin, QuantLinear) else None
    return twin if kept is None else kept
