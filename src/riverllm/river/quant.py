"""A weight-only quantized linear layer: HQQ does the quantizing, torch's int4 kernels the math.

HQQ (half-quadratic quantization) needs no calibration data, which is what makes the river
training-free. It gives, per group of `group_size` input columns, an integer code q in
[0, 2^bits), a scale s and a (float) zero z, with W ~ (q - z) * s.

How the forward runs, fastest first:
- 4 bits, CUDA: `torch._weight_int4pack_mm` (bf16 activations), the kernel SPEC.md section 2
  measured at 2.3-2.4x bf16 for a whole 8B layer stack on an H100.
- 4 bits, CPU: `torch._weight_int4pack_mm_for_cpu`; it is fast for bf16 activations only, so
  activations are cast to bf16 around it (W4A16, as in the paper).
- anything else (2, 3, 8 bits, or shapes the int4 kernels refuse): dequantize on the fly with
  HQQ's own `Quantizer.dequantize` and a plain matmul. Correct everywhere, not fast.

Torch's int4 kernels compute W = (q - 8) * scale + zero, so HQQ's (q - z) * s maps onto them
exactly with scale = s and zero = (8 - z) * s. That conversion is the only thing written by hand
here: no library packs HQQ's output for these kernels without pulling in torchao.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from hqq.core.quantize import Quantizer
from torch import nn

from riverllm import cpu

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_BACKENDS = ("int4_cuda", "int4_cpu")  # their packed layouts differ: a cache keeps them apart
PACKING = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}

# HQQ's optimizer makes about 20 elementwise passes over the weight per iteration, for up to 20
# iterations. Over a whole MLP matrix (4.4M floats for Qwen2.5-0.5B: 17 MB per temporary) every
# pass streams through memory; over a block of 64K floats (256 KB) the temporaries stay in the
# core's L2 cache. Measured on Qwen2.5-Coder-0.5B's down_proj at one thread: 1.77 s whole, 0.43 s
# in blocks, the same mean reconstruction error to 9 digits (docs/results/model_cache/). Groups
# are independent in HQQ's update; only its early stop, taken per block instead of per matrix,
# differs.
HQQ_BLOCK_ELEMENTS = 1 << 16


def hqq_meta(bits: int, group_size: int, shape: torch.Size, scale: torch.Tensor, zero: torch.Tensor) -> dict:
    """The metadata `Quantizer.dequantize` and `Quantizer.unpack` read, for codes packed by HQQ."""
    return {"nbits": bits, "group_size": group_size, "shape": shape, "axis": 1, "packing": PACKING[bits],
            "unpack_view_dtype": torch.int32 if bits == 3 else torch.uint8, "view_as_float": False,
            "scale": scale, "zero": zero}


def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int,
                 block_elements: int = HQQ_BLOCK_ELEMENTS, optimize: bool = True) -> tuple[torch.Tensor, dict]:
    """HQQ's (packed codes, meta) for `weight` [out, in], optimized in blocks of whole rows of
    about `block_elements` weights (see HQQ_BLOCK_ELEMENTS). Rows are grouped along the input
    dimension (axis 1), so concatenating the blocks' groups gives the whole matrix's groups in order."""
    weight = weight.detach().float()
    rows = max(1, block_elements // weight.shape[1])
    codes, scales, zeros = [], [], []
    for block in weight.split(rows):
        block_codes, block_meta = Quantizer.quantize(
            block, nbits=bits, group_size=group_size, optimize=optimize, axis=1, bitpack=False,
            compute_dtype=torch.float32, device=weight.device)
        codes.append(block_codes)
        scales.append(block_meta["scale"])
        zeros.append(block_meta["zero"])
    packed = Quantizer.pack[PACKING[bits]](torch.cat(codes))
    return packed, hqq_meta(bits, group_size, weight.shape, torch.cat(scales), torch.cat(zeros))


def pick_backend(backend: str, bits: int, group_size: int, out_features: int, in_features: int,
                 device: torch.device) -> str:
    """The forward a layer of this shape runs on `device` ("auto": the fastest that accepts it)."""
    if backend != "auto":
        return backend
    int4_ok = bits == 4 and group_size in INT4_GROUP_SIZES
    if device.type == "cuda":
        # The CUDA kernel tiles N by 8 and K by 16 * inner_k_tiles (8).
        int4_ok = int4_ok and out_features % 8 == 0 and in_features % 128 == 0
        return "int4_cuda" if int4_ok else "dequant"
    if device.type == "cpu":
        return "int4_cpu" if int4_ok and in_features % 2 == 0 else "dequant"
    return "dequant"


class QuantLinear(nn.Module):
    """A drop-in replacement for `nn.Linear` holding HQQ-quantized weights."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 64, backend: str = "auto",
                 quantized: tuple[torch.Tensor, dict] | None = None,
                 packed: dict[str, torch.Tensor] | None = None, optimize: bool = True,
                 codes_source: Callable[[], tuple[torch.Tensor, dict]] | None = None):
        """`quantized`: HQQ's (codes, meta) for this weight from an earlier run (see build.py's
        river cache); when given, the slow HQQ optimisation is skipped. `packed`: this layer's
        int4 kernel buffers (`int4_buffers()`) from an earlier run on the same backend; when given,
        the codes are not even unpacked (the rest of a start from the river cache), and
        `codes_source` reads them back if they are ever needed (`dequantized_weight`).
        optimize=False: plain round-to-nearest per group (what the low-bit LM head uses)."""
        super().__init__()
        weight = linear.weight.detach()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = bits, group_size
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if self.in_features % group_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of group size {group_size}")

        self.backend = self._pick_backend(backend, weight.device)
        self.dequantized: torch.Tensor | None = None  # dequant backend: the weight kept (`keep_dequantized`)
        if packed is not None and self.backend in INT4_BACKENDS:
            self.hqq_state = None  # already built and cached: nothing will save it again
            self._codes_source = codes_source
            self.register_buffer("scales_and_zeros", packed["scales_and_zeros"].to(weight.device))
            self.register_buffer("packed", packed["packed"].to(weight.device))
            return
        if quantized is None:
            # HQQ's optimizer runs in fp32 on the weight's own device: a few ms per matrix on a GPU.
            quantized = hqq_quantize(weight, bits, group_size, optimize=optimize)
        codes_packed, meta = quantized
        self.hqq_state = {"codes": codes_packed, "scale": meta["scale"], "zero": meta["zero"]}
        if self.backend == "dequant":
            self.codes_packed = codes_packed
            self.meta = meta
            return

        codes = self._unpack(codes_packed, meta)
        n_groups_per_row = self.in_features // group_size
        scale = meta["scale"].reshape(self.out_features, n_groups_per_row).float()
        zero = meta["zero"].reshape(self.out_features, n_groups_per_row).float()
        # [K / group, N, 2]: the layout both int4 kernels take.
        scales_and_zeros = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        if self.backend == "int4_cuda":
            # The CUDA kernel takes two 4-bit codes per byte, high nibble first.
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
            self.register_buffer("packed", torch._convert_weight_to_int4pack(pairs, 8))
        else:
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))

    def _pick_backend(self, backend: str, device: torch.device) -> str:
        return pick_backend(backend, self.bits, self.group_size, self.out_features, self.in_features, device)

    def _unpack(self, codes_packed: torch.Tensor, meta: dict) -> torch.Tensor:
        """HQQ's packed codes as one uint8 code per weight, [out, in]."""
        codes = Quantizer.unpack[meta["packing"]](codes_packed, dtype=torch.uint8)
        return codes[: self.out_features * (self.in_features // self.group_size)].reshape(
            self.out_features, self.in_features)

    def hqq_codes(self) -> tuple[torch.Tensor, dict]:
        """HQQ's (packed codes, meta): kept from the build, or read back from the river cache."""
        if self.hqq_state is not None:
            state = self.hqq_state
            return state["codes"], hqq_meta(self.bits, self.group_size, torch.Size((self.out_features, self.in_features)),
                                            state["scale"], state["zero"])
        if self._codes_source is None:
            raise RuntimeError("this layer was loaded from int4 kernel buffers without its HQQ codes")
        return self._codes_source()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, as a dense float32 tensor [out, in]. For the int4
        kernels that is their own arithmetic, (q - 8) * scale + zero with the bfloat16 scale and
        zero they read (rounded to bfloat16 it equals the kernel applied to an identity matrix,
        bit for bit: tests/test_river_build.py)."""
        codes_packed, meta = self.hqq_codes()
        if self.backend == "dequant":
            return Quantizer.dequantize(codes_packed, meta).reshape(self.out_features, self.in_features).float()
        scales_and_zeros = self.scales_and_zeros.float()  # [in / group, out, 2]
        scale, zero = (scales_and_zeros[..., i].t().repeat_interleave(self.group_size, dim=1) for i in (0, 1))
        return (self._unpack(codes_packed, meta).to(scale.device).float() - 8) * scale + zero

    def _int4_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.backend == "int4_cuda":
            return torch._weight_int4pack_mm(x2d, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group_size, self.scales_and_zeros)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequant backend's weight, as its forward computes it."""
        return Quantizer.dequantize(self.codes_packed, self.meta).reshape(self.out_features, self.in_features).to(dtype)

    def keep_dequantized(self, dtype: torch.dtype) -> int:
        """Dequant backend: keep the weight dequantized in `dtype` rather than rebuilding it on every
        call (a 4864 x 896 3-bit matrix: 34 ms a call on one CPU thread, 1.1 ms kept). The same
        tensor either way, so the same results; the memory is a dense copy's. Returns the bytes kept."""
        if self.backend != "dequant":
            return 0
        self.dequantized = self._dequantize(dtype)
        return self.dequantized.nbytes

    def kept_linear(self) -> nn.Linear | None:
        """The kept dequantized weight as a plain nn.Linear computing what this layer computes (in
        the kept dtype), so the engine multiplies it like a backbone layer, in row-stable groups
        (engine/block.py's `stable_rows`); None when nothing is kept."""
        if self.dequantized is None:
            return None
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(self.dequantized.dtype), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dequant":
            weight = self.dequantized
            if weight is None or weight.dtype != x.dtype:
                weight = self._dequantize(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self._int4_matmul(x2d).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}, backend={self.backend}"

    def int4_buffers(self) -> dict[str, torch.Tensor]:
        """The int4 kernel's buffers (empty for the dequant backend), for the river cache."""
        if self.backend not in INT4_BACKENDS:
            return {}
        return {"packed": self.packed, "scales_and_zeros": self.scales_and_zeros}

    def weight_bytes(self) -> int:
        """Bytes of weight data read per forward here: the kept dequantized weight, or the codes."""
        return self.dequantized.nbytes if self.dequantized is not None else self.code_bytes()

    def code_bytes(self) -> int:
        """Bytes of the low-bit weight itself (codes + scales/zeros), whatever this backend keeps
        beside it: what a twin of this bit width reads where a kernel for it exists."""
        if self.backend == "dequant":
            return self.codes_packed.numel() * self.codes_packed.element_size() + 2 * self.meta["scale"].numel() * 2
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


def keep_dequantized(river: nn.Module, dtype: torch.dtype) -> int:
    """On a CPU, keep the weights of a river's dequant-backend twins (3-bit, 2-bit, 8-bit: no int4
    kernel) dequantized in `dtype`, when the machine has the memory (`cpu.has_memory_for`): a 3-bit
    river then decodes about as fast as a dense backbone instead of ~30x slower, with the same
    numbers. Returns the bytes kept (0: none)."""
    modules = [m for m in river.modules() if isinstance(m, QuantLinear) and m.backend == "dequant"
               and m.codes_packed.device.type == "cpu"]
    needed = sum(m.out_features * m.in_features for m in modules) * dtype.itemsize
    if not modules or not cpu.has_memory_for(needed):
        return 0
    return sum(m.keep_dequantized(dtype) for m in modules)
