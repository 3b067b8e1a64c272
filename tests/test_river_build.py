"""The river's HQQ runs block-wise (quant.hqq_quantize): the twins stay as accurate as HQQ's own
whole-matrix quantization, at every bit width."""

from __future__ import annotations

import pytest
import torch
from hqq.core.quantize import Quantizer

from conftest import tiny_model
from riverllm.river.quant import hqq_quantize


def reconstruction_error(weight: torch.Tensor, codes: torch.Tensor, meta: dict) -> float:
    return float((Quantizer.dequantize(codes, meta).reshape(weight.shape) - weight).abs().mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_blockwise_hqq_is_as_accurate_as_whole_matrix_hqq(bits):
    model = tiny_model("qwen2")
    for name, linear in model.model.layers[1].named_modules():
        if not isinstance(linear, torch.nn.Linear):
            continue
        weight = linear.weight.detach().float()
        whole = Quantizer.quantize(weight, nbits=bits, group_size=64, optimize=True, axis=1,
                                   compute_dtype=torch.float32, device="cpu")
        # Blocks of 2 rows: many blocks even on a tiny matrix.
        blocks = hqq_quantize(weight, bits, 64, block_elements=2 * weight.shape[1])
        assert blocks[1]["shape"] == weight.shape and blocks[0].shape == whole[0].shape, name
        old, new = reconstruction_error(weight, *whole), reconstruction_error(weight, *blocks)
        assert new <= old * 1.01, (name, old, new)


def test_blockwise_twins_decode_like_whole_matrix_twins():
    from riverllm.river import QuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(5, 256)
    whole = QuantLinear(linear, 4, 64, quantized=Quantizer.quantize(
        linear.weight.detach(), nbits=4, group_size=64, optimize=True, axis=1, compute_dtype=torch.float32,
        device="cpu"))
    blocks = QuantLinear(linear, 4, 64)
    reference = linear(x)
    old, new = (whole(x) - reference).norm() / reference.norm(), (blocks(x) - reference).norm() / reference.norm()
    assert new <= old * 1.02 + 1e-4
