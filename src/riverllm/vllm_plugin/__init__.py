"""River-LLM inside vLLM: an out-of-tree model plugin (docs/vllm.md).

`pip install "riverllm[vllm]"` declares `register` below as a `vllm.general_plugins` entry point,
so every vLLM process (server, workers, `LLM(...)`) registers the River architectures at start.
A model runs with River when its architecture is overridden, e.g.

    LLM(model=DIR, hf_overrides={"architectures": ["RiverLlamaForCausalLM"], "river_tau": 0.9},
        dtype="float32", enforce_eager=True)

Nothing here imports vLLM at module level: the plugin hands vLLM `module:class` strings, which
vLLM imports lazily (its own advice, so that registering never initializes a device).
"""

from __future__ import annotations

# vLLM architecture name -> the River class that subclasses vLLM's own model of that family.
RIVER_ARCHITECTURES = {
    "RiverLlamaForCausalLM": "riverllm.vllm_plugin.model:RiverLlamaForCausalLM",
    "RiverQwen2ForCausalLM": "riverllm.vllm_plugin.model:RiverQwen2ForCausalLM",
}
# The dense architecture each River variant wraps (what a HF config.json names).
DENSE_TO_RIVER = {"LlamaForCausalLM": "RiverLlamaForCausalLM", "Qwen2ForCausalLM": "RiverQwen2ForCausalLM"}


def register() -> None:
    """The `vllm.general_plugins` entry point: register the River architectures with vLLM."""
    from vllm import ModelRegistry

    for architecture, target in RIVER_ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
