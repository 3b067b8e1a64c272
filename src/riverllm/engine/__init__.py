"""The decoding engine: one forward step with early exit (`core.py`), the KV cache the backbone
and the river share (`cache.py`), and the token loop with sampling and stopping (`generate.py`).
It knows nothing of the CLI or the server."""

from riverllm.engine.cache import KVCache
from riverllm.engine.core import RiverEngine, StepOutput
from riverllm.engine.generate import GenerationResult, SamplingConfig, StepEvent, decode
from riverllm.engine.lossless import DraftConfig, DraftStats, decode_lossless

__all__ = ["KVCache", "RiverEngine", "StepOutput", "GenerationResult", "SamplingConfig", "StepEvent", "decode",
           "DraftConfig", "DraftStats", "decode_lossless"]
