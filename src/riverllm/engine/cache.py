"""The KV cache that backbone layer j and its twin share.

Why not a transformers cache: transformers' caches append (DynamicCache) or roll (sliding-window
layers), and their `update` no longer receives the write position. Early exit needs a cache that
writes K/V at explicit slots, so that a method can later fill a slot it left empty (EE-LLM's
recompute) or leave it empty on purpose (D-LLM's mask), and that records per layer which slots
hold K/V. This class is that, in the shape transformers' attention modules call: `update`.

Layout: slot s of row b is the s-th token of that row, left padding included, so one slot index
serves the whole batch. Every layer, full-attention or sliding, keeps all slots; sliding windows
are applied by the attention mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingTokens:
    """Tokens that exited early under EE-LLM's recompute strategy: their K/V are missing from layer
    `next_layer` (0-based) up; `hidden` [batch, n, hidden] is their input to that layer."""

    slots: torch.Tensor
    hidden: torch.Tensor
    next_layer: int


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.device, self.dtype = device, dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # filled[j, b, s]: layer j holds K/V for slot s of row b.
        self.filled = torch.zeros(num_layers, batch_size, max_len, dtype=torch.bool, device=device)
        # Set by the engine before each layer call: where this call writes, and how many slots
        # attention reads (slots 0..visible-1).
        self.write_slots: torch.Tensor = torch.zeros(0, dtype=torch.long, device=device)
        self.visible: int = 0
        # Early-exit bookkeeping for the prior strategies (the river never needs it):
        self.has_holes = False  # some layer skipped some slot ("mask", "recompute", SkipDecode)
        self.pending: list[PendingTokens] = []  # EE-LLM: exited tokens whose deeper layers are owed
        self.prompt_slots = 0  # slots taken by the prompt: generated token t sits at slot prompt_slots + t

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store K/V [batch, kv_heads, new, head_dim] at `write_slots`; return all visible K/V."""
        if self.keys[layer_idx] is None:
            shape = (self.batch_size, key.shape[1], self.max_len, key.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, device=self.device, dtype=key.dtype)
            self.values[layer_idx] = torch.zeros(shape, device=self.device, dtype=value.dtype)
        self.keys[layer_idx].index_copy_(2, self.write_slots, key)
        self.values[layer_idx].index_copy_(2, self.write_slots, value)
        self.filled[layer_idx][:, self.write_slots] = True
        return self.keys[layer_idx][:, :, : self.visible], self.values[layer_idx][:, :, : self.visible]

    # transformers' attention code sometimes asks these; answer like a full-length cache.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible

    def is_complete(self, upto: int) -> bool:
        """Every layer holds K/V for every slot 0..upto-1 of every row: no KV hole anywhere."""
        return bool(self.filled[:, :, :upto].all())
