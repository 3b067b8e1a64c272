"""Prompts on GEMM copies: decoding kernels for the few rows of a step, PyTorch GEMMs for prompts.

ggml's quantized products and torch's int4 kernel are built for a decoding step: one to a few
rows, bound by reading the weights. Over a prompt's many rows they are compute-bound and slow
(on the 0.5B Qwen, one thread: a 4864 x 896 int4 twin takes 2.3 ms over 48 prompt rows, ggml's
Q5_0 3x PyTorch's float32 GEMM over 150), while PyTorch's GEMMs in bfloat16 on a CPU that has it
natively (AVX512-BF16 / AMX) are 4-5x faster than float32. So under `--kernels ggml` every
projection a step runs, backbone and twin, is a `PromptSplit`: decoding inputs (one new token per
row) go to the decoding kernel, prompts to a copy of the same weights in the dtype PyTorch
multiplies fastest here.

What it costs: the copies' memory (bfloat16: 2 bytes a weight; 0.7 GB for the 0.5B's twins, built
the first time a river meets a prompt under ggml), and prompt numerics a little different from
the decoding kernel's (a twin's copy is its exact int4 weight rounded to bfloat16). Decoding steps,
lossless verification rows and batches never take the copies, and a prompt is prefilled alone, so
a row's result still never depends on what it is batched with.
"""

from __future__ import annotations

import copy

from torch import nn

from riverllm.cpu import fast_cpu_dtype
from riverllm.river.quant import QuantLinear


class PromptSplit(nn.Module):
    """`step` for decoding inputs [rows, 1, in], `prompt` (an nn.Linear, or a `Concat` of them) for prompts
    [rows, new > 1, in]."""

    def __init__(self, step: nn.Module, prompt: nn.Module):
        super().__init__()
        self.step, self.prompt = step, prompt
        self.prompt_dtype = next(prompt.parameters()).dtype

    def forward(self, x):
        if x.dim() == 3 and x.shape[1] > 1:
            return self.prompt(x.to(self.prompt_dtype)).to(x.dtype)
        return self.step(x)

    def weight_bytes(self) -> int:
        """What a decoding step reads (the prompt copy is read once per prompt)."""
        return self.step.weight_bytes()


def prompt_copy(linear: nn.Module) -> nn.Linear:
    """The weights of `linear` (an nn.Linear, or a QuantLinear twin: its dequantized weight) as an
    nn.Linear in the dtype PyTorch multiplies fastest on this CPU."""
    dtype = fast_cpu_dtype()
    if isinstance(linear, QuantLinear):
        copied = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        copied.weight = nn.Parameter(linear.dequantized_weight().to(dtype), requires_grad=False)
        if linear.bias is not None:
            copied.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return copied
    if linear.weight.dtype == dtype:
        return linear
    return copy.deepcopy(linear).to(dtype).requires_grad_(False)


def with_prompt_copy(step: nn.Module, weights: nn.Module | None = None) -> PromptSplit:
    """`step` for decoding, a `prompt_copy` of `weights` (default: of `step` itself) for prompts."""
    return PromptSplit(step, prompt_copy(step if weights is None else weights))
