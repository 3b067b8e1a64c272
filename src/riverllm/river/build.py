"""Building the Exit River: one low-bit twin per decoder layer, no data, no training.

A twin is the decoder layer's own module (same class, same forward) in which every `nn.Linear`
of attention and MLP is replaced by a `QuantLinear`. Norms are shared with the backbone, not
copied (they are tiny and stay full precision, as in the paper). The twin keeps the layer's
`layer_idx`, so it reads and writes the very same KV-cache slot as backbone layer j: that is
River-LLM's KV sharing, and why the cache never has holes.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from riverllm.files import write_atomic
from riverllm.river.quant import QuantLinear, hqq_meta

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    backend: str = "auto"  # auto | int4_cuda | int4_cpu | dequant

    def __post_init__(self) -> None:
        from riverllm.errors import RiverError

        if self.bits not in SUPPORTED_BITS:
            raise RiverError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise RiverError(f"--group-size must be one of 16, 32, 64, 128, 256, got {self.group_size}")


def _make_twin(layer: nn.Module, config: QuantConfig, saved: dict | None, prefix: str) -> nn.Module:
    # Copy the module tree without copying any tensor: every parameter and buffer of the twin
    # starts as the backbone's own tensor, then the linears are swapped for quantized ones.
    memo = {id(tensor): tensor for tensor in list(layer.parameters()) + list(layer.buffers())}
    twin = copy.deepcopy(layer, memo)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                key = f"{prefix}.{name}.{child_name}"
                quantized = _saved_quantization(saved[key], child, config) if saved else None
                setattr(module, child_name, QuantLinear(child, config.bits, config.group_size, config.backend, quantized))
    return twin


def _saved_quantization(state: dict, linear: nn.Linear, config: QuantConfig) -> tuple[torch.Tensor, dict]:
    """HQQ's (codes, meta) rebuilt from what `_save` stored."""
    device = linear.weight.device
    meta = hqq_meta(config.bits, config.group_size, linear.weight.shape, state["scale"].to(device),
                    state["zero"].to(device))
    return state["codes"].to(device), meta


def weights_fingerprint(layers: nn.ModuleList) -> str:
    """A cheap identity for a stack of layers: shapes plus samples of every weight.
    Hashing every byte of a 1.5B model would take seconds on each start; samples are enough to
    tell models apart, and a stale cache can only arise from editing weights in place."""
    digest = hashlib.sha256()
    for name, tensor in layers.state_dict().items():
        flat = tensor.detach().flatten()
        sample = torch.cat([flat[:1024], flat[-1024:], flat[:: max(1, flat.numel() // 1024)]])
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def build_river(layers: nn.ModuleList, config: QuantConfig = QuantConfig(), progress: bool = False,
                cache_dir: Path | None = None) -> nn.ModuleList:
    """Return the Exit River: `river[j]` is the low-bit twin of `layers[j]`.

    With `cache_dir`, HQQ's output is saved there (keyed by the weights and the quantization
    settings) and reused next time: quantizing is the slow part of a start on a CPU.
    """
    path = None
    saved = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{weights_fingerprint(layers)}-b{config.bits}-g{config.group_size}.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache file is rebuilt, never trusted
                saved = None
    bar = tqdm(layers, desc=f"building the {config.bits}-bit river", unit="layer",
               disable=not progress or saved is not None, leave=False)
    river = nn.ModuleList(_make_twin(layer, config, saved, str(index)) for index, layer in enumerate(bar))
    if path is not None and saved is None:
        _save(river, path)
    return river


def _save(river: nn.ModuleList, path: Path) -> None:
    state = {}
    for index, twin in enumerate(river):
        for name, module in twin.named_modules():
            if isinstance(module, QuantLinear):
                state[f"{index}.{name}"] = {k: v.cpu() for k, v in module.hqq_state.items()}
    write_atomic(path, lambda temp: torch.save(state, temp))


def river_memory_bytes(river: nn.ModuleList) -> int:
    """Bytes of quantized weights in the river (norms are shared with the backbone and not counted)."""
    return sum(m.weight_bytes() for m in river.modules() if isinstance(m, QuantLinear))
