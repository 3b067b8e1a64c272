"""Model shapes to time, and exit-depth profiles to replay on them.

Speed at batch 1 depends only on shapes and on how deep each token runs (SPEC.md section 4), so
the benchmark builds models with the public configs of real models (shipped as JSON in
riverllm/configs/) and random weights, made directly on the target device in the target dtype.
The depths come from a profile: the per-token exit layers a real River-LLM run recorded
(`riverllm generate --json` writes them), scaled to the shape's depth.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from riverllm.errors import RiverError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROFILE_PREFIX = "profile-"
DEFAULT_PROFILE = CONFIG_DIR / "profile-smollm2-135m-river0.9.json"
GPU_SHAPES = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-1.5b")
CPU_SHAPES = ("tiny",)


def list_shapes() -> list[str]:
    """Shipped shapes: the JSON files in configs/ that are transformers configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json")
                  if not p.stem.startswith(PROFILE_PREFIX) and '"model_type"' in p.read_text())


def shape_config(name: str):
    """The transformers config of a shipped shape (keys starting with "_" are notes, dropped)."""
    from transformers import AutoConfig

    path = CONFIG_DIR / f"{name}.json"
    if name not in list_shapes():
        raise RiverError(f"unknown shape '{name}': choose from {', '.join(list_shapes())}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = "sdpa"
    return config


def random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A model of shape `name` with random weights, created on `device` in `dtype` directly
    (no CPU float32 copy first: an 8B model is built in seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    # A random model has no end-of-text token worth stopping at: every run makes all its tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_profile(path: Path) -> tuple[list[int], int]:
    """(exit layers, the recording model's depth) from a `riverllm generate --json` output."""
    try:
        data = json.loads(Path(path).read_text())
        exits, layers = [int(e) for e in data["exit_layers"]], int(data["num_layers"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RiverError(f"cannot read the exit profile {path}: {error}; pass the output of "
                         "`riverllm generate --json` with --profile") from None
    if not exits or layers < 1 or not all(0 <= e <= layers for e in exits):
        raise RiverError(f"the exit profile {path} has no usable exit_layers (each in 0..num_layers)")
    return exits, layers


def scale_profile(exits: list[int], from_layers: int, to_layers: int, min_exit: int = 2) -> list[int]:
    """Exit layers recorded on a `from_layers`-deep model, moved to a `to_layers`-deep one at the
    same relative depth. "Never exited" stays never exited, and no token exits before layer
    `min_exit` (layer 1's similarity is near 0 on real models, so real exits start at 2)."""
    scaled = []
    for exit_layer in exits:
        if exit_layer >= from_layers:
            scaled.append(to_layers)
        else:
            scaled.append(min(to_layers, max(min_exit, round(exit_layer * to_layers / from_layers))))
    return scaled
