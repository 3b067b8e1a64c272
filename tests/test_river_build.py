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


@pytest.mark.parametrize("shape", [(96, 256), (256, 128)])
def test_dequantized_weight_is_what_the_int4_kernel_computes_with(shape, tmp_path):
    """The dense weight a twin reports (what prompt copies under --kernels ggml are made of):
    rounded to bfloat16 it equals the int4 kernel applied to an identity matrix, bit for bit,
    both for a freshly built twin and for one started from the river cache (its codes read back)."""
    from riverllm.river.build import QuantConfig, build_river

    torch.manual_seed(0)
    out_features, in_features = shape
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()  # keyed LAYER.MODULE.NAME in the cache, as a decoder layer's linears
    layer.mlp.proj = torch.nn.Linear(in_features, out_features)
    layers = torch.nn.ModuleList([layer])
    fresh = build_river(layers, QuantConfig(4, 64), cache_dir=tmp_path)[0].mlp.proj
    cached = build_river(layers, QuantConfig(4, 64), cache_dir=tmp_path)[0].mlp.proj
    assert fresh.backend == "int4_cpu" and fresh.hqq_state is not None and cached.hqq_state is None
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    for twin in (fresh, cached):
        through_kernel = twin._int4_matmul(eye).t()
        assert torch.equal(twin.dequantized_weight().to(torch.bfloat16), through_kernel)
    x = torch.randn(4, in_features)
    assert torch.allclose(torch.nn.functional.linear(x, fresh.dequantized_weight(), fresh.bias), fresh(x),
                          atol=0.03, rtol=0.02)  # the kernel rounds x to bfloat16


def test_dequantized_weight_of_a_3_bit_twin_is_hqqs():
    from riverllm.river.quant import QuantLinear

    torch.manual_seed(0)
    twin = QuantLinear(torch.nn.Linear(128, 64), 3, 64)
    codes, meta = twin.hqq_codes()
    assert twin.backend == "dequant"
    assert torch.equal(twin.dequantized_weight(), Quantizer.dequantize(codes, meta).reshape(64, 128).float())


def test_a_twin_kept_dequantized_computes_exactly_what_it_computed_per_call(monkeypatch):
    """Twins with no int4 kernel (3-bit here) keep their dequantized weight once instead of per
    call (`keep_dequantized`, which RiverLM.river applies): the same outputs, bit for bit, in the
    dtype it was kept in and in any other; not kept where memory is short."""
    from riverllm import RiverLM, cpu
    from riverllm.bench.token_bytes import quantized_bytes
    from riverllm.river.quant import QuantLinear, keep_dequantized

    torch.manual_seed(0)
    twin = QuantLinear(torch.nn.Linear(128, 96), 3, 64)
    x = torch.randn(5, 128)
    per_call = {dtype: twin(x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    codes = twin.code_bytes()
    assert twin.keep_dequantized(torch.bfloat16) == 128 * 96 * 2 and twin.weight_bytes() == 128 * 96 * 2
    # what the token-bytes pricing reads: still the 3-bit codes (and 16-bit scales/zeros)
    assert twin.code_bytes() == codes and 128 * 96 * 3 / 8 <= codes < 128 * 96 * 2 / 3
    assert quantized_bytes(torch.nn.ModuleList([twin])) == codes
    assert all(torch.equal(twin(x.to(dtype)), out) for dtype, out in per_call.items())

    lm = RiverLM(tiny_model("llama"), tokenizer=None)
    river = lm.river(3)
    twins = [m for m in river.modules() if isinstance(m, QuantLinear)]
    assert twins and all(m.dequantized is not None and m.dequantized.dtype == torch.float32 for m in twins)
    monkeypatch.setattr(cpu, "available_memory", lambda: 1000)
    fresh = torch.nn.ModuleList([QuantLinear(torch.nn.Linear(128, 96), 3, 64)])
    assert keep_dequantized(fresh, torch.float32) == 0 and fresh[0].dequantized is None
