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
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from riverllm.files import write_atomic
from riverllm.river.quant import QuantLinear, hqq_meta, pick_backend

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


class SavedRiver:
    """A river cache file, read lazily: safetensors maps it, and only the tensors a twin needs on
    this device are read. Per linear `KEY` (`LAYER.MODULE.NAME`) it holds HQQ's `KEY.codes`,
    `KEY.scale`, `KEY.zero` and, for an int4 backend, that kernel's ready buffers
    `KEY.BACKEND.packed` and `KEY.BACKEND.scales_and_zeros`: a start from the cache then only maps
    them (no unpacking, no repacking; this was 12 of the 1.5B's 19 s of river loading)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = set(self._file.keys())

    def int4_buffers(self, key: str, backend: str) -> dict[str, torch.Tensor] | None:
        names = {"packed": f"{key}.{backend}.packed", "scales_and_zeros": f"{key}.{backend}.scales_and_zeros"}
        if not all(name in self._keys for name in names.values()):
            return None
        return {field: self._file.get_tensor(name) for field, name in names.items()}

    def quantization(self, key: str, shape: torch.Size, device: torch.device,
                     config: QuantConfig) -> tuple[torch.Tensor, dict]:
        """HQQ's (codes, meta) of a weight of `shape`, rebuilt from what `_save` stored."""
        meta = hqq_meta(config.bits, config.group_size, shape,
                        self._file.get_tensor(f"{key}.scale").to(device), self._file.get_tensor(f"{key}.zero").to(device))
        return self._file.get_tensor(f"{key}.codes").to(device), meta


def _make_twin(layer: nn.Module, config: QuantConfig, saved: SavedRiver | None, prefix: str) -> nn.Module:
    # Copy the module tree without copying any tensor: every parameter and buffer of the twin
    # starts as the backbone's own tensor, then the linears are swapped for quantized ones.
    memo = {id(tensor): tensor for tensor in list(layer.parameters()) + list(layer.buffers())}
    twin = copy.deepcopy(layer, memo)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                key = f"{prefix}.{name}.{child_name}"
                out_features, in_features = child.weight.shape
                backend = pick_backend(config.backend, config.bits, config.group_size, out_features, in_features,
                                       child.weight.device)
                shape, device = child.weight.shape, child.weight.device
                packed = saved.int4_buffers(key, backend) if saved else None
                quantized = saved.quantization(key, shape, device, config) if saved and packed is None else None
                # Read only if someone asks for the dense weight (prompt copies under --kernels ggml).
                codes_source = partial(saved.quantization, key, shape, device, config) if packed is not None else None
                setattr(module, child_name, QuantLinear(child, config.bits, config.group_size, backend, quantized,
                                                        packed, codes_source=codes_source))
    return twin


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
    path = saved = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{weights_fingerprint(layers)}-b{config.bits}-g{config.group_size}.safetensors"
        if path.exists():
            try:
                saved = SavedRiver(path)
                return nn.ModuleList(_make_twin(layer, config, saved, str(index)) for index, layer in enumerate(layers))
            except Exception:  # a damaged cache file (truncated, missing tensors) is rebuilt, never trusted
                saved = None
    bar = tqdm(layers, desc=f"building the {config.bits}-bit river", unit="layer", disable=not progress,
               leave=False, bar_format="{desc}: {n}/{total} layers [{elapsed} elapsed, ETA {remaining}]")
    river = nn.ModuleList(_make_twin(layer, config, None, str(index)) for index, layer in enumerate(bar))
    if path is not None:
        _save(river, path)
    return river


def _save(river: nn.ModuleList, path: Path) -> None:
    from safetensors.torch import save_file

    state = {}
    for index, twin in enumerate(river):
        for name, module in twin.named_modules():
            if isinstance(module, QuantLinear):
                key = f"{index}.{name}"
                state.update({f"{key}.{field}": tensor for field, tensor in module.hqq_state.items()})
                state.update({f"{key}.{module.backend}.{field}": tensor
                              for field, tensor in module.int4_buffers().items()})
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    write_atomic(path, lambda temp: save_file(state, temp))


def river_memory_bytes(river: nn.ModuleList) -> int:
    """Bytes of quantized weights in the river (norms are shared with the backbone and not counted)."""
    return sum(m.weight_bytes() for m in river.modules() if isinstance(m, QuantLinear))


HEAD_BITS = (4,)


def low_bit_head(lm_head: nn.Linear, bits: int = 4, group_size: int = 64) -> QuantLinear:
    """A low-bit copy of the LM head (the model's own stays as it is).

    On the Qwen models the 151,936-row head is most of what a River token reads (on the 0.5B,
    36 ms of a 91 ms river:0.9 step, one CPU thread; int4: 7 ms). Lossless decoding drafts with
    it by default (the backbone's verification makes any draft approximation safe); plain River
    offers it as an option whose fidelity cost docs/lossless.md measures. Round-to-nearest per
    group, not HQQ's optimisation: the head alone would take HQQ minutes on a CPU."""
    from riverllm.errors import RiverError

    if bits not in HEAD_BITS:
        raise RiverError(f"the low-bit LM head supports {', '.join(map(str, HEAD_BITS))} bits, got {bits}")
    return QuantLinear(lm_head, bits, group_size, optimize=False)
