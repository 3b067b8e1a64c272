"""CUDA graphs for decoding: the same step as `RiverEngine.forward`, replayed instead of launched.

At batch 1 a decoder layer is a few dozen small kernels, and launching them one by one from
Python costs about as much as running them; the saving River-LLM makes on weight reads would
hide behind that overhead. So decoding replays captured CUDA graphs:

- one *embed* graph: token embedding, position ids, RoPE cos/sin and the attention masks of the
  new token, written into static buffers every later graph reads;
- one *backbone* graph per decoder layer j, in two variants: plain, and with the exit rule's
  cosine written into a static device buffer (used only at layers where the rule can decide:
  at batch 1 it is a dozen tiny kernels, worth skipping elsewhere);
- one *suffix* graph per exit layer l (0..L): twins l+1..L, final norm and LM head, writing the
  logits into a static buffer. Exit L is the plain head (dense); exit 0 is all twins (w4).

The host runs the embed graph, then backbone graphs one by one; where the exit rule can decide
(`policy.exits_after` gives different answers for s = +inf and s = -inf) it reads the layer's
minimum cosine, one float, with `.item()`: the only device-to-host read per backbone layer.
Then it replays the suffix of the exit layer. Dense, w4 and river therefore run on the very same
machinery, so their speed ratios compare like with like.

What makes this capturable: every tensor a graph reads or writes has a fixed address. The KV
cache (`StaticKVCache`) is preallocated; during decoding it writes K/V at a slot held in a device
tensor (`index_copy_`) and hands attention *all* `max_len` slots, with the keys beyond the
current slot masked out. Position ids, masks and RoPE live in static buffers updated in place.
Graphs are captured lazily (on first use), all into one memory pool: they run one after another
and pass data only through the static buffers, so their scratch memory can be shared.

Prefill (many new tokens) runs eagerly through `RiverEngine.forward` on the same cache.

Off CUDA (or with `use_graphs=False`) the runner calls the same step functions directly instead
of replaying graphs; that is how the CPU tests check the static-buffer logic token by token
against the eager engine. The graph capture itself can only be exercised on a GPU
(tests marked `gpu`).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from riverllm.engine.cache import KVCache
from riverllm.engine.core import RiverEngine, StepOutput
from riverllm.policy import ExitPolicy

WARMUP_RUNS = 2  # eager runs on a side stream before each capture (lazy inits, cuBLAS handles)
MAX_LEN_STEP = 256  # runners are reused across generations; their length is rounded up to this


class StaticKVCache(KVCache):
    """A `KVCache` whose K/V buffers exist from the start and never move.

    While `static` is False it is the ordinary cache (prefill writes at `write_slots` and reads the
    visible slots). While `static` is True (decode graphs) `update` writes the one new token at
    `decode_slot`, a device tensor updated in place, and returns all `max_len` slots: attention
    then relies on the mask, which hides the slots after the current one.
    """

    def __init__(self, engine: RiverEngine, batch_size: int, max_len: int):
        super().__init__(engine.num_layers, batch_size, max_len, engine.device, engine.dtype)
        config = engine.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch_size, kv_heads, max_len, head_dim)
        for index in range(self.num_layers):
            self.keys[index] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.values[index] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.decode_slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.static = False

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.static:
            return super().update(key, value, layer_idx, *args, **kwargs)
        self.keys[layer_idx].index_copy_(2, self.decode_slot, key)
        self.values[layer_idx].index_copy_(2, self.decode_slot, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def reset(self) -> None:
        """Forget every slot (the old K/V stay in memory but are masked and overwritten)."""
        self.filled.zero_()
        self.static = False
        self.has_holes, self.pending = False, []


class GraphRunner:
    """Decoding steps of one engine at one batch size, replayed from CUDA graphs.

    `forward` has `RiverEngine.forward`'s signature, so `decode` (engine/generate.py) can call
    either. Prefill and any call with more than one new token go to the eager engine.
    """

    def __init__(self, engine: RiverEngine, batch_size: int, max_len: int, use_graphs: bool | None = None):
        self.engine = engine
        self.batch_size, self.max_len = batch_size, max_len
        self.use_graphs = engine.device.type == "cuda" if use_graphs is None else use_graphs
        self.num_layers = engine.num_layers
        # What the graphs were captured with: a `free_backbone` afterwards makes the runner stale.
        self.layers = list(engine.layers)
        self.resident_layers = engine.resident_layers
        self.cache = StaticKVCache(engine, batch_size, max_len)

        device, dtype = engine.device, engine.dtype
        hidden_size = engine.config.hidden_size
        # Inputs of a step (written by the host before the embed graph).
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pad_counts = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.deciding = torch.ones(batch_size, dtype=torch.bool, device=device)  # rows whose cosine counts
        # Written by the embed graph, read by the layer graphs.
        self.hidden = torch.zeros(batch_size, 1, hidden_size, dtype=dtype, device=device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.key_slots = torch.arange(max_len, device=device)
        self.layer_types = sorted(set(engine.layer_types))
        self.masks = {t: torch.zeros(batch_size, 1, 1, max_len, dtype=dtype, device=device) for t in self.layer_types}
        self.rope = {t: (cos.clone(), sin.clone()) for t, (cos, sin) in engine.rotary(self.hidden, self.position_ids).items()}
        # Dynamic RoPE recomputes its frequencies with a host-side branch: not capturable, so
        # those models compute cos/sin eagerly before the embed graph.
        self.rope_in_graph = not any("dynamic" in str(kind) for kind in self._rope_types())
        # Written by backbone graphs (exit rule) and suffix graphs (logits).
        self.row_similarity = torch.zeros(self.num_layers, batch_size, 1, dtype=torch.float32, device=device)
        self.lowest_similarity = torch.zeros(self.num_layers, dtype=torch.float32, device=device)
        self.logits = torch.zeros(batch_size, engine.lm_head.weight.shape[0], dtype=dtype, device=device)

        self.layer_kwargs = [
            dict(attention_mask=self.masks[t], position_ids=self.position_ids, past_key_values=self.cache,
                 use_cache=True, position_embeddings=self.rope[t])
            for t in engine.layer_types
        ]
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.steps: dict[tuple, Callable[[], None]] = {}  # captured (or plain) step functions
        self.similarity_reads = 0  # device-to-host reads made by the exit rule (for the benchmark)

    def _rope_types(self) -> list:
        kinds = getattr(self.engine.rotary_emb, "rope_type", "default")
        return list(kinds.values()) if isinstance(kinds, dict) else [kinds]

    def matches(self, engine: RiverEngine) -> bool:
        """Still valid for `engine`: same layer modules (no `free_backbone` since capture)."""
        return (engine is self.engine and engine.resident_layers == self.resident_layers
                and all(a is b for a, b in zip(self.layers, engine.layers)))

    def reset(self) -> None:
        self.cache.reset()

    # --- the step functions (each one becomes a graph) ---------------------------------------

    def _embed_step(self) -> None:
        engine = self.engine
        hidden = engine.embed_tokens(self.input_ids)
        self.hidden.copy_(hidden)
        slot = self.cache.decode_slot
        self.position_ids.copy_((slot - self.pad_counts).clamp(min=0)[:, None])
        if self.rope_in_graph:
            self._write_rope(hidden)
        # The same rule as RiverEngine.attention_masks, for one new token at `slot`, over all slots.
        keys = self.key_slots
        current = keys == slot
        allowed = (keys[None, :] <= slot) & (keys[None, :] >= self.pad_counts[:, None])
        for layer_type, mask in self.masks.items():
            window = engine.sliding_window if layer_type == "sliding_attention" else None
            allowed_here = allowed & (slot - keys < window)[None, :] if window is not None else allowed
            allowed_here = allowed_here | current[None, :]  # never a fully masked row (NaN)
            mask.zero_().masked_fill_(~allowed_here[:, None, None, :], torch.finfo(mask.dtype).min)
        # Every layer writes this slot at every decoding step (backbone or twin: River-LLM's KV sharing).
        self.cache.filled |= current

    def _write_rope(self, hidden: torch.Tensor) -> None:
        for layer_type, (cos, sin) in self.engine.rotary(hidden, self.position_ids).items():
            self.rope[layer_type][0].copy_(cos)
            self.rope[layer_type][1].copy_(sin)

    def _backbone_step(self, index: int, with_similarity: bool) -> None:
        output = self.engine.layers[index](self.hidden, **self.layer_kwargs[index])
        if with_similarity:
            # A dozen tiny kernels per layer, so only where the rule reads it (see `forward`).
            similarity = F.cosine_similarity(self.hidden.float(), output.float(), dim=-1)  # [batch, 1]
            self.row_similarity[index].copy_(similarity)
            if self.batch_size > 1:  # at batch 1 the host reads row_similarity itself
                lowest = similarity.masked_fill(~self.deciding[:, None], math.inf).min()
                self.lowest_similarity[index].copy_(lowest)
        self.hidden.copy_(output)

    def _lowest_similarity(self, index: int) -> float:
        """The one device-to-host read of the exit rule: the minimum cosine over deciding rows.
        (At batch 1 the single row decides: a finished row ends the generation anyway.)"""
        self.similarity_reads += 1
        if self.batch_size == 1:
            return self.row_similarity[index, 0, 0].item()
        return self.lowest_similarity[index].item()

    def _suffix_step(self, exit_layer: int, river: nn.ModuleList | None) -> None:
        hidden = self.hidden
        for index in range(exit_layer, self.num_layers):
            hidden = river[index](hidden, **self.layer_kwargs[index])
        self.logits.copy_(self.engine.head(hidden)[:, -1])

    # --- capture and replay ------------------------------------------------------------------

    def _run(self, key: tuple, step: Callable[[], None]) -> None:
        """Run one step: replay its graph, capturing it first if this is its first use."""
        replay = self.steps.get(key)
        if replay is None:
            replay = self.steps[key] = self._capture(step)
        replay()

    def _capture(self, step: Callable[[], None]) -> Callable[[], None]:
        if not self.use_graphs:
            return step
        # Warm-up and capture happen in the middle of a step: the warm-up runs change `hidden`
        # in place (backbone steps), so it is restored before each run and after; everything
        # else they write (K/V at this step's slot, similarities, logits) the replay rewrites
        # with the same values.
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
            step()
        return graph.replay

    # --- the step, as RiverEngine.forward ----------------------------------------------------

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
        if cache is not self.cache:
            raise ValueError("GraphRunner.forward needs the runner's own cache (runner.cache)")
        batch, new = input_ids.shape
        # Graphs serve River-LLM's own decoding steps; prefill, the prior KV strategies (holes,
        # recompute) and SkipDecode schedules run on the eager engine, on the same cache.
        eager = (new != 1 or all_logits or policy.kv_strategy != "river" or policy.depth_schedule is not None
                 or self.cache.has_holes)
        if eager:
            self.cache.static = False
            return self.engine.forward(input_ids, cache, start_slot, pad_counts, policy, river, active_rows,
                                       all_logits, record_similarities)
        if batch != self.batch_size or not 0 <= start_slot < self.max_len:
            raise ValueError(f"runner built for batch {self.batch_size} and {self.max_len} slots, "
                             f"got batch {batch} at slot {start_slot}")

        self.cache.static = True
        self.input_ids.copy_(input_ids)
        self.cache.decode_slot.fill_(start_slot)
        self.pad_counts.copy_(pad_counts)
        if active_rows is None:
            self.deciding.fill_(True)
        else:
            self.deciding.copy_(active_rows)
        self._run(("embed",), self._embed_step)
        if not self.rope_in_graph:
            self._write_rope(self.hidden)

        exit_layer, compare = policy.start_layer(), False
        if exit_layer is None:
            exit_layer, compare = self.num_layers, policy.needs_similarity or record_similarities
        similarities: list[torch.Tensor] = []
        for index in range(self.num_layers):
            if index >= exit_layer:
                break
            if index >= self.engine.resident_layers:
                raise RuntimeError(f"backbone layer {index + 1} was freed; "
                                   f"set max_backbone_layers <= {self.engine.resident_layers}")
            layer = index + 1
            # The cosine is computed and read only where it can change the decision (the rule
            # answers differently for s = +inf and s = -inf), or where it is asked for.
            decides = compare and policy.exits_after(layer, math.inf) != policy.exits_after(layer, -math.inf)
            with_similarity = decides or (compare and record_similarities)
            self._run(("backbone", index, with_similarity),
                      lambda i=index, c=with_similarity: self._backbone_step(i, c))
            if compare and record_similarities:
                similarities.append(self.row_similarity[index].clone())
            if decides:
                leaves = policy.exits_after(layer, self._lowest_similarity(index))
            else:
                leaves = policy.exits_after(layer, 0.0)
            if leaves:
                exit_layer = layer
                break

        if exit_layer < self.num_layers and river is None:
            raise RuntimeError("this step exits early but no river was given")
        suffix_river = river if exit_layer < self.num_layers else None
        self._run(("suffix", exit_layer, id(suffix_river)), lambda: self._suffix_step(exit_layer, suffix_river))
        return StepOutput(self.logits.clone(), exit_layer, similarities)


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
