"""One forward step of a decoder-only transformers model, layer by layer, with early exit.

This is the model's own `forward` unrolled (embeddings, rotary embeddings, masks, decoder layers,
final norm, LM head) so that after every backbone layer the exit rule can look at the residual
stream, and from the exit layer on the river's twins run instead. The decoder layers themselves
are transformers' own modules: we only decide which one runs.

Works for models with the standard decoder layout (`model.model.embed_tokens/layers/norm/
rotary_emb`, `model.lm_head`): Llama, Qwen2, Qwen3, Mistral, Gemma3 (text), Phi3.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from riverllm.engine.cache import KVCache, PendingTokens
from riverllm.policy import ExitPolicy


@dataclass
class StepOutput:
    logits: torch.Tensor  # [batch, vocab] at the last position, or [batch, seq, vocab] with all_logits
    exit_layer: int  # backbone layers run (1-based layer after which the step left; L: never left)
    similarities: list[torch.Tensor] = field(default_factory=list)  # per backbone layer run: [batch, seq]


class RiverEngine:
    def __init__(self, model: nn.Module):
        self.model = model
        decoder = model.model
        self.config = model.config
        self.embed_tokens = decoder.embed_tokens
        self.layers: nn.ModuleList = decoder.layers
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
        self.layer_types = self._layer_types()
        self.sliding_window = getattr(self.config, "sliding_window", None)
        self._rope_by_layer_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        # Layers [resident_layers:] of the backbone may have been freed (`RiverLM.free_backbone`).
        self.resident_layers = self.num_layers

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

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.num_layers, batch_size, max_len, self.device, self.dtype)

    # --- pieces of the model's forward ------------------------------------------------------

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._rope_by_layer_type:
            return {t: self.rotary_emb(hidden, position_ids, t) for t in set(self.layer_types)}
        shared = self.rotary_emb(hidden, position_ids)
        return {t: shared for t in set(self.layer_types)}

    def attention_masks(self, slots: torch.Tensor, pad_counts: torch.Tensor, visible: int,
                        force: bool = False) -> dict[str, torch.Tensor | None]:
        """Boolean "may attend" masks [batch, new, visible] per layer type, or None where plain
        causal attention is exact (then sdpa runs its causal kernel, as transformers itself does).
        `slots` may be any set of query slots, not only a contiguous run."""
        masks: dict[str, torch.Tensor | None] = {}
        has_padding = bool(pad_counts.any())
        keys = torch.arange(visible, device=slots.device)
        for layer_type in set(self.layer_types):
            window = self.sliding_window if layer_type == "sliding_attention" else None
            if not force and not has_padding and (window is None or visible <= window):
                masks[layer_type] = None
                continue
            allowed = keys[None, :] <= slots[:, None]
            if window is not None:
                allowed &= slots[:, None] - keys[None, :] < window
            allowed = allowed[None] & (keys[None, None, :] >= pad_counts[:, None, None])
            masks[layer_type] = allowed
        return masks

    def additive(self, allowed: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor | None:
        """[batch, new, visible] bool -> the [batch, 1, new, visible] additive mask attention takes."""
        if allowed is None:
            return None
        keys = torch.arange(allowed.shape[-1], device=allowed.device)
        allowed = allowed | (keys[None, None, :] == slots[None, :, None])  # no fully masked rows: no NaN
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        start_slot: int,
        pad_counts: torch.Tensor,
        policy: ExitPolicy,
        river: nn.ModuleList | None = None,
        active_rows: torch.Tensor | None = None,
        all_logits: bool = False,
        record_similarities: bool = False,
    ) -> StepOutput:
        """Run `input_ids` [batch, new] at slots start_slot.. through backbone and river.

        pad_counts[b]: left-padding slots of row b. active_rows: rows whose similarity counts in
        the exit decision (finished rows keep decoding padding but must not hold the batch back).
        """
        batch, new = input_ids.shape
        slots = torch.arange(start_slot, start_slot + new, device=input_ids.device)
        cache.visible = start_slot + new
        # Tokens whose similarity may decide: real (not padding) and in an active row.
        deciding = slots[None, :] >= pad_counts[:, None]
        if active_rows is not None:
            deciding = deciding & active_rows[:, None]

        hidden = self.embed_tokens(input_ids)
        strategy = policy.kv_strategy
        holes_possible = strategy != "river" or cache.has_holes
        masks = self.attention_masks(slots, pad_counts, cache.visible, force=holes_possible)
        rope = self.rotary(hidden, (slots[None, :] - pad_counts[:, None]).clamp(min=0))

        exit_layer = policy.start_layer()
        scheduled = policy.scheduled_depth(start_slot - cache.prompt_slots, self.num_layers)
        if scheduled is not None:
            exit_layer = scheduled
        compare = exit_layer is None and (policy.needs_similarity or record_similarities)
        if exit_layer is None:
            exit_layer = self.num_layers
        similarities: list[torch.Tensor] = []
        exit_hidden = hidden
        for index in range(self.num_layers):
            layer_type = self.layer_types[index]
            if index < exit_layer:
                if index >= self.resident_layers:
                    raise RuntimeError(f"backbone layer {index + 1} was freed; set max_backbone_layers <= {self.resident_layers}")
                output = self._run_layer(self.layers[index], index, hidden, slots, pad_counts, cache, masks[layer_type],
                                         rope[layer_type], with_pending=strategy == "recompute")
                lowest = 0.0  # not looked at by policies that do not compare (forced exits)
                if compare:
                    similarity = F.cosine_similarity(hidden.float(), output.float(), dim=-1)
                    similarities.append(similarity)
                    # The one device-to-host read per backbone layer.
                    lowest = similarity.masked_fill(~deciding, float("inf")).min().item()
                if exit_layer == self.num_layers and policy.exits_after(index + 1, lowest):
                    exit_layer = index + 1
                hidden = exit_hidden = output
            elif strategy == "river":
                if river is None:
                    raise RuntimeError("this step exits early but no river was given")
                hidden = self._run_layer(river[index], index, hidden, slots, pad_counts, cache, masks[layer_type],
                                         rope[layer_type])
            elif strategy == "propagate":
                # CALM: the exit-layer state is copied upward; each skipped layer only projects it
                # to K/V (its attention runs to write them; the output is discarded).
                layer = self.layers[index]
                cache.write_slots = slots
                layer.self_attn(hidden_states=layer.input_layernorm(exit_hidden),
                                attention_mask=self.additive(self._with_holes(masks[layer_type], index, cache, slots), slots),
                                position_ids=None, past_key_values=cache, position_embeddings=rope[layer_type])
            else:
                break  # mask / recompute / SkipDecode: these layers write nothing for this token

        if exit_layer < self.num_layers and strategy != "river":
            cache.has_holes = cache.has_holes or strategy != "propagate"
            if strategy == "recompute":
                cache.pending.append(PendingTokens(slots, exit_hidden, exit_layer))
        final = hidden if strategy == "river" else exit_hidden
        logits = self.head(final if all_logits else final[:, -1:])
        return StepOutput(logits if all_logits else logits[:, -1], exit_layer, similarities)

    def _with_holes(self, allowed: torch.Tensor | None, index: int, cache: KVCache, query_slots: torch.Tensor):
        """Restrict a mask to the slots layer `index` holds K/V for (plus those written now)."""
        if allowed is None or not cache.has_holes:
            return allowed
        held = cache.filled[index, :, : allowed.shape[-1]].clone()
        held[:, query_slots] = True
        return allowed & held[:, None, :]

    def _run_layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, slots: torch.Tensor,
                   pad_counts: torch.Tensor, cache: KVCache, allowed: torch.Tensor | None,
                   rope: tuple[torch.Tensor, torch.Tensor], with_pending: bool = False) -> torch.Tensor:
        """One decoder layer for the step's tokens; under EE-LLM's recompute, tokens that exited
        earlier and owe this layer's K/V run it in the same batch, ahead of the new tokens."""
        owed = [p for p in cache.pending if p.next_layer == index] if with_pending else []
        if owed:
            all_slots = torch.cat([p.slots for p in owed] + [slots])
            hidden = torch.cat([p.hidden for p in owed] + [hidden], dim=1)
            positions = (all_slots[None, :] - pad_counts[:, None]).clamp(min=0)
            rope = self.rotary(hidden, positions)[self.layer_types[index]]
            keys_seen = cache.visible
            allowed = self.attention_masks(all_slots, pad_counts, keys_seen, force=True)[self.layer_types[index]]
        else:
            all_slots = slots
            positions = (slots[None, :] - pad_counts[:, None]).clamp(min=0)
        cache.write_slots = all_slots
        output = layer(hidden, attention_mask=self.additive(self._with_holes(allowed, index, cache, all_slots), all_slots),
                       position_ids=positions, past_key_values=cache, use_cache=True, position_embeddings=rope)
        if not owed:
            return output
        start = 0
        for pending in owed:
            count = pending.slots.numel()
            pending.hidden, pending.next_layer = output[:, start:start + count], index + 1
            start += count
        cache.pending = [p for p in cache.pending if p.next_layer < self.num_layers]
        return output[:, start:]
