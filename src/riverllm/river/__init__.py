"""The Exit River: a low-bit twin of every decoder layer (see `build.py`), made of `QuantLinear`s."""

from riverllm.river.build import HEAD_BITS, QuantConfig, build_river, low_bit_head, river_memory_bytes
from riverllm.river.quant import QuantLinear, keep_dequantized

__all__ = ["HEAD_BITS", "QuantConfig", "QuantLinear", "build_river", "keep_dequantized", "low_bit_head", "river_memory_bytes"]
