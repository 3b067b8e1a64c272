"""riverllm: training-free token-level early exit for decoder-only LLMs (River-LLM).

A 4-bit twin of every decoder layer (the Exit River) shares the KV cache with the backbone, so a
token can leave at any layer and the river fills in the rest of the depth, KV cache included.
"""

from riverllm.api import RiverLM, StreamEvent, load
from riverllm.engine import GenerationResult
from riverllm.errors import RiverError
from riverllm.policy import ExitPolicy, Method
from riverllm.river import QuantConfig, build_river

__version__ = "0.1.0"
__all__ = ["RiverLM", "StreamEvent", "load", "GenerationResult", "RiverError", "ExitPolicy", "Method",
           "QuantConfig", "build_river", "__version__"]
