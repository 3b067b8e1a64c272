"""bfloat16 weights packed once for oneDNN (kernels/onednn.py): the same bits as F.linear at every
row count, so packing changes no token, only the time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from riverllm.engine.block import Projections, stable_rows
from riverllm import cpu
from riverllm.kernels.onednn import MAX_PACKED_ROWS, PackedLinear, pack_projections, packing_is_exact

from conftest import tiny_model

needs_exact_packing = pytest.mark.skipif(not packing_is_exact(torch.bfloat16),
                                         reason="this CPU's packed bfloat16 products differ from F.linear's "
                                                "(riverllm then does not pack)")


@needs_exact_packing
@pytest.mark.parametrize("shape,bias", [((4864, 896), False), ((896, 4864), False), ((1152, 896), True),
                                        ((2000, 96), False)])
def test_a_packed_linear_equals_f_linear_at_every_row_count(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight and isinstance(packed, nn.Linear)  # shared, not copied
    x = torch.randn(MAX_PACKED_ROWS + 3, 1, shape[1]).to(torch.bfloat16)
    with torch.no_grad():
        for rows in [*range(1, 18), MAX_PACKED_ROWS + 3]:  # decoding rows, then a prompt-sized input
            assert torch.equal(packed(x[:rows]), F.linear(x[:rows], linear.weight, linear.bias)), rows
        # and through the engine's row groups: a row's bits do not depend on its batch
        alone = [stable_rows(packed, x[r:r + 1]) for r in range(17)]
        batch = stable_rows(packed, x[:17])
        assert all(torch.equal(batch[r:r + 1], alone[r]) for r in range(17))


@needs_exact_packing
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_a_bfloat16_model_decodes_the_same_tokens_packed_and_plain(family):
    """RiverLM packs a bfloat16 CPU model's backbone and head; dense and river decoding, alone and
    batched, give exactly the tokens and exit layers of the same engine on the plain modules."""
    from riverllm import RiverLM
    from riverllm.engine import decode
    from riverllm.policy import ExitPolicy

    model = tiny_model(family).to(torch.bfloat16)
    lm = RiverLM(model, tokenizer=None)
    engine, river = lm.engine, lm.river()
    assert isinstance(engine.head_linear, PackedLinear)
    assert all(isinstance(m, PackedLinear) for weights in engine.backbone for m in weights.modules())
    assert type(model.lm_head) is nn.Linear  # the model's own modules are left alone
    prompts = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 3], [250, 11, 64, 9, 31, 200, 18, 4]]
    policies = [(ExitPolicy(), None), (ExitPolicy(tau=0.5), river)]  # dense (never exits), river

    def rows(events):
        return [([e.tokens[r] for e in events], [e.exit_layers[r] for e in events]) for r in range(len(events[0].tokens))]

    def decode_all():
        return [([rows(list(decode(engine, [p], policy, twins, 12)))[0] for p in prompts],
                 rows(list(decode(engine, prompts, policy, twins, 12)))) for policy, twins in policies]

    packed = decode_all()
    engine.use_kernels([Projections.of(layer) for layer in engine.layers], engine.lm_head)
    plain = decode_all()
    assert packed == plain
    for alone, batched in packed:
        assert alone == batched
    assert any(e < engine.num_layers for _, exits in packed[1][0] for e in exits)  # the river did exit


def test_float32_and_short_memory_keep_the_plain_modules(monkeypatch):
    model = tiny_model("llama")
    backbone = [Projections.of(layer) for layer in model.model.layers]
    assert pack_projections(backbone, model.lm_head) == (backbone, model.lm_head)  # float32: MKL, not packed
    model = model.to(torch.bfloat16)
    backbone = [Projections.of(layer) for layer in model.model.layers]
    monkeypatch.setattr(cpu, "available_memory", lambda: 1000)
    assert pack_projections(backbone, model.lm_head) == (backbone, model.lm_head)
