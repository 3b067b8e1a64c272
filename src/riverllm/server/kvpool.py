"""The server's KV cache: one pool of fixed-size blocks shared by the rows of the running batch.

The engine's `KVCache` gives every row `max_len` slots up front, so a batch of 16 rows able to
hold the whole context window would reserve 16 contexts of memory (SmolLM2: 16 x 377 MB). Here a
row holds only the blocks its own request can need: `reserve(row, tokens)` takes
ceil(tokens / block_size) blocks from the pool when the request is admitted, and `release(row)`
gives them back the moment the request ends or its client leaves. A long request uses memory for
itself only, and the pool's size (`--kv-cache-tokens`) bounds the server's KV memory whatever the
traffic.

Blocks are reserved for the whole request (prompt + max_tokens) at admission, not grown on
demand: a row that started can always finish, so nothing is ever preempted or recomputed (which
would also break exactness: a prompt prefilled again with its generated tokens takes other exit
decisions than the tokens took one by one).

To the engine this is a `KVCache` (same `write` / `read` / `lengths` interface): `write` scatters
each token's K/V to its physical slot through the row's slot map, and `read` gathers a row's
slots 0..visible-1 into a contiguous [n, kv_heads, visible, head_dim] tensor, bit for bit what
the dense cache's gathered read returns, so attention (and every answer) is unchanged.
The free list is a stack: freed blocks are reused first, so the memory actually touched stays
that of the busiest moment, not of the whole pool.
"""

from __future__ import annotations

import math

import torch

from riverllm.engine.cache import KVCache
from riverllm.engine.core import RiverEngine

DEFAULT_BLOCK_SIZE = 16  # tokens per block: small enough to waste little, large enough to keep tables short


class PagedKVCache(KVCache):
    def __init__(self, engine: RiverEngine, rows: int, max_len: int, capacity_tokens: int,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        # Not KVCache.__init__: it would allocate rows x max_len slots, which is what this avoids.
        self.num_layers, self.rows, self.max_len = engine.num_layers, rows, max_len
        self.device, self.dtype = engine.device, engine.dtype
        self.block_size = block_size
        self.num_blocks = max(1, math.ceil(capacity_tokens / block_size))
        slots = self.num_blocks * block_size
        # [physical slot, kv_heads, head_dim]; torch.empty: pages are committed only when written,
        # and a slot is always written before any row reads it.
        shape = (slots, engine.kv_heads, engine.head_dim)
        self.keys = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.lengths = [0] * rows
        self.filled = None  # River never leaves holes; prior strategies get their own dense cache
        self.has_holes = False
        self.pending = []
        self.prompt_lengths = [0] * rows
        # slot_map[r, s]: physical slot of row r's logical slot s (valid below its reserved blocks).
        self.slot_map = torch.zeros(rows, max_len, dtype=torch.long, device=self.device)
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._write_memo: tuple | None = None  # the step's (rows, slots) -> physical slots, once per step

    # --- blocks ---------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        """Slots reserved by the rows now holding a request."""
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def reserve(self, row: int, tokens: int) -> None:
        """Give free row `row` blocks for `tokens` slots (the caller checked `can_reserve`)."""
        if self.tables[row] or self.lengths[row]:
            raise RuntimeError(f"cache row {row} is in use")
        if tokens > self.max_len or not self.can_reserve(tokens):
            raise RuntimeError(f"cannot reserve {tokens} slots for row {row}")
        blocks = [self._free.pop() for _ in range(self.blocks_for(tokens))]
        self.tables[row] = blocks
        table = torch.tensor(blocks, device=self.device)
        physical = (table[:, None] * self.block_size + torch.arange(self.block_size, device=self.device)).flatten()
        count = min(len(physical), self.max_len)
        self.slot_map[row, :count] = physical[:count]

    def release(self, row: int) -> None:
        """Free row `row` and return its blocks to the pool."""
        self._free.extend(reversed(self.tables[row]))
        self.tables[row] = []
        self.reset_row(row)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.rows) if not self.tables[r] and self.lengths[r] == 0]

    # --- what the engine calls ------------------------------------------------------------------

    def _rows(self, rows: torch.Tensor | slice | None, n: int) -> torch.Tensor | slice:
        return torch.arange(n, device=self.device) if rows is None else rows

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None,
              slots: torch.Tensor, start: int | None) -> None:
        memo = self._write_memo
        if memo is None or memo[0] is not rows or memo[1] is not slots:  # the step's context tensors
            physical = self.slot_map[self._rows(rows, key.shape[0])[:, None], slots]
            memo = self._write_memo = (rows, slots, physical)
        physical = memo[2]
        self.keys[layer][physical] = key.transpose(1, 2)  # [n, new, kv_heads, head_dim]
        self.values[layer][physical] = value.transpose(1, 2)

    def read(self, layer: int, rows: torch.Tensor | slice | None, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.slot_map[self._rows(rows, self.rows), :visible]  # [n, visible]
        keys = self.keys[layer][index].transpose(1, 2).contiguous()
        values = self.values[layer][index].transpose(1, 2).contiguous()
        return keys, values

    def is_complete(self, upto: int, row: int = 0) -> bool:
        raise NotImplementedError("the paged cache keeps no `filled` map (River never leaves holes)")
