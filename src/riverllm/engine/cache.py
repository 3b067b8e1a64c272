"""The KV cache that backbone layer j and its twin share.

One preallocated K and V tensor per layer, [rows, kv_heads, max_len, head_dim]. Row r of the cache
holds one sequence; slot s of that row is the sequence's s-th token, so a token's slot is also its
position (no left padding: each row has its own length, `lengths[r]`). A step writes each new
token's K/V at its row's next slots, whichever weight set (backbone or twin) computed them: that
is River-LLM's KV sharing, and why the river never leaves a hole.

Every layer, full-attention or sliding, keeps all slots; sliding windows are applied by the
attention mask. The buffers never move, so a CUDA graph can read and write them.

The prior early-exit strategies (EE-LLM's recompute, D-LLM's mask, SkipDecode) do leave holes; for
them, and for tests, `track_filled=True` records per layer which slots hold K/V (`filled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingTokens:
    """Tokens that exited early under EE-LLM's recompute strategy: their K/V are missing from layer
    `next_layer` (0-based) up; `hidden` [rows, n, hidden] is their input to that layer and `slots`
    [rows, n] where they sit."""

    slots: torch.Tensor
    hidden: torch.Tensor
    next_layer: int


class KVCache:
    def __init__(self, num_layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, track_filled: bool = False):
        self.num_layers, self.rows, self.max_len = num_layers, rows, max_len
        self.device, self.dtype = device, dtype
        shape = (rows, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * rows  # host copy: slots are decided on the host, no device read
        # filled[j, r, s]: layer j holds K/V for slot s of row r (only with track_filled).
        self.filled = torch.zeros(num_layers, rows, max_len, dtype=torch.bool, device=device) if track_filled else None
        # Prior strategies' bookkeeping (the river needs none of it):
        self.has_holes = False  # some layer skipped some slot
        self.pending: list[PendingTokens] = []  # EE-LLM: exited tokens whose deeper layers are owed
        self.prompt_lengths = [0] * rows  # SkipDecode counts generated tokens from here

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None,
              slots: torch.Tensor, start: int | None) -> None:
        """Store K/V [n, kv_heads, new, head_dim] of rows `rows` (None: all) at `slots` [n, new].
        `start`: when every row writes the same contiguous slots start..start+new-1 (batch 1,
        equal lengths), a plain slice write, cheaper than the general scatter."""
        if start is not None and rows is None:
            self.keys[layer][:, :, start:start + key.shape[2]] = key
            self.values[layer][:, :, start:start + key.shape[2]] = value
        else:
            row_index = (torch.arange(key.shape[0], device=key.device) if rows is None else rows)[:, None]
            self.keys[layer][row_index, :, slots] = key.transpose(1, 2)
            self.values[layer][row_index, :, slots] = value.transpose(1, 2)
        if self.filled is not None:
            row_index = (torch.arange(key.shape[0], device=key.device) if rows is None else rows)[:, None]
            self.filled[layer][row_index, slots] = True

    def read(self, layer: int, rows: torch.Tensor | slice | None, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of slots 0..visible-1 of `rows` (None: all rows, or a slice: a view; else a gathered copy)."""
        keys, values = self.keys[layer][:, :, :visible], self.values[layer][:, :, :visible]
        if rows is None:
            return keys, values
        return keys[rows], values[rows]

    def is_complete(self, upto: int, row: int = 0) -> bool:
        """Every layer holds K/V for every slot 0..upto-1 of `row`: no KV hole (needs track_filled)."""
        return bool(self.filled[:, row, :upto].all())

    def free_rows(self) -> list[int]:
        return [r for r, length in enumerate(self.lengths) if length == 0]

    def reset_row(self, row: int) -> None:
        """Forget row `row` (its slots are overwritten by the next sequence; masks hide the rest)."""
        self.lengths[row] = 0
        self.prompt_lengths[row] = 0
        if self.filled is not None:
            self.filled[:, row] = False
