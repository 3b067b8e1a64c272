"""What the benchmark measures with, and the arithmetic it reports.

- `time_call`: wall time of one call, with CUDA events on a GPU (the call ends in a host sync
  anyway, since every decoding step reads its token) and `perf_counter` elsewhere.
- `copy_bandwidth`: a large device-to-device copy, counted as bytes read plus bytes written;
  this is the memory bandwidth that bounds batch-1 decoding, measured in the same run.
- `WeightBytes`: bytes of weights read per token, layer by layer (backbone layer j at full
  precision, its 4-bit twin, the final norm + LM head, one embedding row), so that any exit
  schedule turns into bytes per token and, divided by the bandwidth, into the HBM bound.
- `ReplayedExits`: an exit policy that replays a list of exit layers, one per forward step.
"""

from __future__ import annotations

import math

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from riverllm.policy import ExitPolicy
from riverllm.river import QuantLinear


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device`."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy of `num_bytes` (read + write both counted)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    seconds = median([time_call(lambda: target.copy_(source), device) for _ in range(repeats)])
    return 2 * num_bytes / seconds


# --- weights read per token --------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of weights a forward of `module` reads: every parameter, plus the quantized codes
    and scales of its `QuantLinear`s (shared tensors, like a twin's norms, count: they are read)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            total += sub.weight_bytes() + _tensor_bytes(sub.bias)
        else:
            total += sum(_tensor_bytes(p) for p in sub.parameters(recurse=False))
    return total


@dataclass
class WeightBytes:
    """Per-token weight reads of one model: `backbone[j]` and `twin[j]` for layer j (0-based)."""

    backbone: list[int]
    head: int  # final norm + LM head (with tied embeddings this is the embedding matrix)
    embed_row: int  # one row of the embedding table
    twin: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, engine, river: nn.ModuleList | None = None) -> "WeightBytes":
        embedding = engine.embed_tokens.weight
        return cls(
            backbone=[module_weight_bytes(layer) for layer in engine.layers],
            head=module_weight_bytes(engine.norm) + module_weight_bytes(engine.lm_head),
            embed_row=embedding.shape[1] * embedding.element_size(),
            twin=[module_weight_bytes(twin) for twin in river] if river is not None else [],
        )

    def per_token(self, exit_layer: int) -> int:
        """Bytes read by a token that runs backbone layers 1..exit_layer and twins after that."""
        twins = sum(self.twin[exit_layer:]) if exit_layer < len(self.backbone) else 0
        return self.embed_row + sum(self.backbone[:exit_layer]) + twins + self.head

    def mean_per_token(self, exit_layers: Iterable[int]) -> float:
        exit_layers = list(exit_layers)
        return sum(self.per_token(e) for e in exit_layers) / len(exit_layers)


def resident_bytes(modules: Iterable[nn.Module | None]) -> int:
    """Bytes of parameters and buffers held by `modules`, each storage counted once (tied
    embeddings, the norms twins share with the backbone)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        tensors = list(module.parameters()) + list(module.buffers())
        for sub in module.modules():
            if isinstance(sub, QuantLinear) and sub.backend == "dequant":
                tensors.append(sub.codes_packed)
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# --- replaying exit layers ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayedExits(ExitPolicy):
    """Exits at `exits[i]` on the i-th forward step (the prefill first), cycling through the list.

    With `read_similarity` the steps also compute and read the exit rule's cosine at every layer
    where a real threshold rule would (layers min_exit_layer+1 .. exit), and still exit where
    the list says: the same work as a real River-LLM run that took these exits, so that the time
    difference to the plain replay is the cost of the exit decision itself.
    """

    exits: tuple[int, ...] = ()
    read_similarity: bool = False
    # [next step, exit of the current step]: the one piece of state, in a frozen dataclass.
    cursor: list = field(default_factory=lambda: [0, 0], compare=False, hash=False, repr=False)

    @property
    def needs_similarity(self) -> bool:
        return self.read_similarity

    def start_layer(self) -> int | None:
        step, self.cursor[0] = self.cursor[0], self.cursor[0] + 1
        self.cursor[1] = self.exits[step % len(self.exits)]
        if not self.read_similarity or self.cursor[1] <= self.min_exit_layer:
            return self.cursor[1]
        return None

    def rule_at(self, layer: int) -> str:
        # Without reads: leave where the list says. With reads: compute (and read) the cosine at
        # exactly the layers where a threshold rule would, up to and including the exit layer,
        # and let `leaves` answer as the list says.
        if not self.read_similarity:
            return "leave" if layer >= self.cursor[1] else "stay"
        return "compare" if layer > self.min_exit_layer else ("leave" if layer >= self.cursor[1] else "stay")

    def leaves(self, similarity, layer: int):
        return similarity > (-math.inf if layer >= self.cursor[1] else math.inf)
