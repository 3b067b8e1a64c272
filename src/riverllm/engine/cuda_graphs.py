"""CUDA graphs for decoding: the engine's own step, with its pieces replayed instead of launched.

At batch 1 a decoder block is a few dozen small kernels, and launching them one by one from
Python costs about as much as running them; the saving River-LLM makes on weight reads would
hide behind that overhead. So decoding replays captured CUDA graphs.

`GraphRunner` is a `RiverEngine` (it shares the engine's modules, blocks and weights) that
overrides only the pieces of a step, never the step itself: the exit loop, the mask rule and the
errors are `RiverEngine.forward`'s. For a decoding step (one new token per row, river strategy):

- `embed`: one graph embeds the tokens and writes the slots' rotary embeddings and masks (THE mask
  rule, `RiverEngine.allowed_keys`, over all `max_len` slots) into static buffers;
- `run_layer`: one graph per (block, weight-set mode, with cosine or not): "backbone", "twin",
  or "blend" when rows of the batch run different sets (`RowSplit.blend`, fixed shapes); it reads
  and writes one static hidden-state buffer and, where the exit rule reads it, writes the block's
  cosine into a static buffer that `similarity` returns (the loop then makes its one host read);
- `final_logits`: one graph for the final norm and LM head.

What makes this capturable: every tensor a graph touches has a fixed address. The KV cache is
preallocated; a step writes K/V at slots held in a device tensor and attention reads all
`max_len` slots with the mask hiding those after each row's own. Graphs are captured lazily (on
first use), all into one memory pool: they run one after another and pass data only through the
static buffers. Prefill, teacher forcing and the prior strategies run the eager engine's pieces
on the same cache. Finished rows stay in the batch (fixed shapes): they decode padding and never
hold other rows back.

Off CUDA (or with `use_graphs=False`) the runner calls the same pieces directly instead of
replaying graphs; that is how the CPU tests check the static-buffer logic token by token
against the eager engine. The capture itself can only be exercised on a GPU (tests marked `gpu`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from riverllm.engine.block import ALL_BACKBONE, ALL_TWIN, Projections, RowSplit
from riverllm.engine.cache import KVCache
from riverllm.engine.core import RiverEngine, StepContext

WARMUP_RUNS = 2  # eager runs on a side stream before each capture (lazy inits, cuBLAS handles)
MAX_LEN_STEP = 256  # runners are reused across generations; their length is rounded up to this


class GraphRunner(RiverEngine):
    """Decoding steps of one engine at one batch size, replayed from CUDA graphs."""

    def __init__(self, engine: RiverEngine, batch_size: int, max_len: int, use_graphs: bool | None = None):
        self.__dict__.update(engine.__dict__)  # the same modules, blocks and weight lists
        self.source = engine
        self.batch_size, self.max_len = batch_size, max_len
        self.use_graphs = engine.device.type == "cuda" if use_graphs is None else use_graphs
        # What the graphs were captured with: a `free_backbone` afterwards makes the runner stale.
        self.backbone = list(engine.backbone)
        self.cache = engine.new_cache(batch_size, max_len)

        device, dtype = engine.device, engine.dtype
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.key_slots = torch.arange(max_len, device=device)
        self.hidden = torch.zeros(batch_size, 1, engine.config.hidden_size, dtype=dtype, device=device)
        self.masks = {t: torch.zeros(batch_size, 1, 1, max_len, dtype=torch.bool, device=device)
                      for t in set(engine.layer_types)}
        self.rope = {t: (cos.clone(), sin.clone()) for t, (cos, sin) in engine.rotary(self.hidden, self.slots).items()}
        # Dynamic RoPE recomputes its frequencies with a host-side branch: not capturable, so
        # those models compute cos/sin eagerly after the embed graph.
        kinds = getattr(engine.rotary_emb, "rope_type", "default")
        self.rope_in_graph = not any("dynamic" in str(k) for k in (kinds.values() if isinstance(kinds, dict) else [kinds]))
        self.backbone_rows = torch.ones(batch_size, 1, 1, dtype=torch.bool, device=device)  # for "blend"
        self.cosine = torch.zeros(engine.num_layers, batch_size, 1, dtype=torch.float32, device=device)
        self.logits = torch.zeros(batch_size, engine.lm_head.weight.shape[0], dtype=dtype, device=device)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.steps: dict[tuple, Callable[[], None]] = {}  # captured (or plain) step functions
        self.similarity_reads = 0  # host reads made by the exit rule (for the benchmark)
        self.static = False  # the current step runs on the static buffers

    def matches(self, engine: RiverEngine) -> bool:
        """Still valid for `engine`: same weights (no `free_backbone` since capture)."""
        return engine is self.source and all(a is b for a, b in zip(self.backbone, engine.backbone))

    def reset(self) -> None:
        for row in range(self.batch_size):
            self.cache.reset_row(row)

    # --- the pieces of a step ---------------------------------------------------------------------

    def embed(self, input_ids, cache, rows, counts, force_masks):
        n, new = input_ids.shape
        self.static = (cache is self.cache and new == 1 and rows is None and not force_masks
                       and n == self.batch_size and counts is None)
        if not self.static:
            return super().embed(input_ids, cache, rows, counts, force_masks)
        self.input_ids.copy_(input_ids)
        self.slots.copy_(torch.tensor(cache.lengths, dtype=torch.long)[:, None])  # host -> device, no sync
        self._run(("embed",), self._embed_step)
        if not self.rope_in_graph:
            self._write_rope()
        ctx = StepContext(rows=None, row_list=list(range(n)), slots=self.slots, counts=[1] * n, start=None,
                          visible=self.max_len, rope=self.rope, masks=self.masks, causal=False)
        return self.hidden, ctx

    def _embed_step(self) -> None:
        self.hidden.copy_(self.embed_tokens(self.input_ids))
        if self.rope_in_graph:
            self._write_rope()
        for layer_type, mask in self.masks.items():
            mask.copy_(self.allowed_keys(self.slots, self.key_slots, self.window(layer_type)))

    def _write_rope(self) -> None:
        for layer_type, (cos, sin) in self.rotary(self.hidden, self.slots).items():
            self.rope[layer_type][0].copy_(cos)
            self.rope[layer_type][1].copy_(sin)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: StepContext, cache: KVCache, split: RowSplit,
                  twins: list[Projections] | None, cosine: bool = False) -> torch.Tensor:
        if not self.static:
            return super().run_layer(index, hidden, ctx, cache, split, twins, cosine)
        if split.mixed:
            # Which rows stay: written in place (no sync), read by the "blend" graph.
            mask = torch.zeros(self.batch_size, 1, 1, dtype=torch.bool)
            mask[list(split.rows)] = True
            self.backbone_rows.copy_(mask)
            split, mode = RowSplit(blend=self.backbone_rows), "blend"
        else:
            mode = "twin" if split.twin_only else "backbone"
        key = ("layer", index, mode, cosine, id(twins) if mode != "backbone" else None)
        self._run(key, lambda: self._layer_step(index, ctx, split, twins, cosine))
        return self.hidden

    def _layer_step(self, index: int, ctx: StepContext, split: RowSplit, twins, cosine: bool) -> None:
        output = RiverEngine.run_layer(self, index, self.hidden, ctx, self.cache, split, twins)
        if cosine:
            self.cosine[index].copy_(F.cosine_similarity(self.hidden.float(), output.float(), dim=-1))
        self.hidden.copy_(output)

    def similarity(self, index: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        if not self.static:
            return super().similarity(index, before, after)
        self.similarity_reads += 1
        return self.cosine[index]

    def final_logits(self, final: torch.Tensor, ctx: StepContext, all_logits: bool,
                     lm_head: nn.Module | None = None) -> torch.Tensor:
        if not self.static or all_logits or lm_head is not None:  # a replacement head runs eagerly
            return super().final_logits(final, ctx, all_logits, lm_head)
        self._run(("head",), lambda: self.logits.copy_(self.head(self.hidden)[:, -1]))
        return self.logits.clone()

    # --- capture and replay -----------------------------------------------------------------------

    def _run(self, key: tuple, step: Callable[[], None]) -> None:
        """Run one piece: replay its graph, capturing it first if this is its first use."""
        replay = self.steps.get(key)
        if replay is None:
            replay = self.steps[key] = self._capture(step)
        replay()

    def _capture(self, step: Callable[[], None]) -> Callable[[], None]:
        if not self.use_graphs:
            return step
        # Warm-up and capture happen in the middle of a step and change `hidden` in place, so it
        # is restored before each run; what else they write (K/V at this step's slots, cosines,
        # logits) the replay rewrites with the same values.
        saved = self.hidden.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self.hidden.copy_(saved)
                step()
            self.hidden.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()  # recorded, not run: `_run` replays it next, as the step's real run
        return graph.replay


def graph_runner(engine: RiverEngine, batch_size: int, max_len: int, use_graphs: bool | None = None) -> GraphRunner:
    """The engine's runner for this batch size, reset for a new generation.

    One runner is kept per engine (on the engine object) and reused while it is long enough, so
    its captured graphs serve every later generation; its length is rounded up to a multiple of
    MAX_LEN_STEP for that reason.
    """
    runner: GraphRunner | None = getattr(engine, "_graph_runner", None)
    wanted_graphs = engine.device.type == "cuda" if use_graphs is None else use_graphs
    if (runner is None or runner.batch_size != batch_size or runner.max_len < max_len
            or runner.use_graphs != wanted_graphs or not runner.matches(engine)):
        engine._graph_runner = None  # drop the old graphs and cache before allocating new ones
        del runner
        gc.collect()
        length = -(-max_len // MAX_LEN_STEP) * MAX_LEN_STEP
        runner = GraphRunner(engine, batch_size, length, wanted_graphs)
        engine._graph_runner = runner
    runner.reset()
    return runner


__all__ = ["GraphRunner", "graph_runner", "ALL_BACKBONE", "ALL_TWIN"]
