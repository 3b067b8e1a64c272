"""The Exit River: a low-bit twin of every decoder layer (see `build.py`), made of `QuantLinear`s."""

from riverllm.river.build import QuantConfig, build_river, river_memory_bytes
from riverllm.river.quant import QuantLinear

__all__ = ["QuantConfig", "QuantLinear", "build_river", "river_memory_bytes"]
