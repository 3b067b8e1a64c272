"""Write a packaged riverllm model (a GGUF) as a HuggingFace directory that vLLM can load.

    python -m riverllm.vllm_plugin.convert smollm2-135m ~/models/smollm2-135m-hf

transformers dequantizes a GGUF on load, but a model loaded that way refuses `save_pretrained`
(it is marked as quantized), so the weights are copied into a fresh model built from the same
config and that one is saved. The directory records the packaged name (`riverllm_source` in
config.json) so that the vLLM plugin finds the tau `riverllm calibrate` stored for that name.
The weights are float32: the GGUF's own rounding is kept, nothing is rounded again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from riverllm.errors import RiverError

SUPPORTED = ("llama", "qwen2")  # families the plugin has River classes for


def convert(model: str, out: Path, force: bool = False) -> Path:
    """Convert `model` (packaged name or .gguf path) into HF directory `out`; returns `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from riverllm.loading import resolve_model

    out = Path(out).expanduser()
    if (out / "config.json").exists() and not force:
        return out
    directory, gguf_file = resolve_model(model)
    if gguf_file is None:
        raise RiverError(f"{model} is already a HuggingFace directory: give it to vLLM as it is")
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    if config.model_type not in SUPPORTED:
        raise RiverError(f"{model} is a {config.model_type} model; the vLLM plugin supports {', '.join(SUPPORTED)}")
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    state = loaded.state_dict()
    config = loaded.config
    # The weights saved here are plain floats: no quantization left for vLLM to apply.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.riverllm_source = model
    config.dtype = torch.float32
    del loaded
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a name that does not match would leave a randomly initialised weight behind.
    fresh.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="packaged name (smollm2-135m, qwen2.5-coder-0.5b, ...) or a .gguf file")
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing directory")
    args = parser.parse_args(argv)
    try:
        print(convert(args.model, args.out, args.force))
    except RiverError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
