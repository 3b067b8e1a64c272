"""The engine against transformers' own `generate`, on tiny random models of three families."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, MORE_FAMILIES, tiny_model
from riverllm.engine import RiverEngine, decode
from riverllm.policy import ExitPolicy
from riverllm.river import QuantConfig, build_river

NEW_TOKENS = 16


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ours(engine, prompt, policy, river=None, new_tokens: int = NEW_TOKENS):
    events = list(decode(engine, [prompt], policy, river, new_tokens))
    return [e.tokens[0] for e in events], [e.exit_layer for e in events]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model = tiny_model(request.param)
    engine = RiverEngine(model)
    return request.param, model, engine, build_river(engine.layers, QuantConfig(bits=4, group_size=64))


def prompt_ids(n: int = 12, seed: int = 1) -> list[int]:
    # Never token 0: transformers treats the pad id inside a prompt as padding.
    return torch.randint(1, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_dense_matches_transformers_generate(family_model):
    _, model, engine, _ = family_model
    prompt = prompt_ids()
    tokens, exits = ours(engine, prompt, ExitPolicy())
    assert tokens == hf_greedy(model, prompt)
    assert exits == [engine.num_layers] * NEW_TOKENS


def test_river_that_never_exits_matches_transformers_generate(family_model):
    _, model, engine, river = family_model
    prompt = prompt_ids(seed=2)
    tokens, exits = ours(engine, prompt, ExitPolicy(tau=1.5), river)
    assert tokens == hf_greedy(model, prompt)
    assert exits == [engine.num_layers] * NEW_TOKENS


@pytest.mark.parametrize("min_exit_layer", [1, 3])
def test_river_that_always_exits_equals_backbone_prefix_plus_twins(family_model, min_exit_layer):
    _, model, engine, river = family_model
    prompt = prompt_ids(seed=3)
    tokens, exits = ours(engine, prompt, ExitPolicy(tau=-1.5, min_exit_layer=min_exit_layer), river)
    earliest = min_exit_layer + 1
    assert exits == [earliest] * NEW_TOKENS
    # The reference is transformers' own generate on a model whose layer list is
    # backbone[:earliest] + twins[earliest:].
    hybrid = copy.deepcopy(model)
    for index in range(earliest, engine.num_layers):
        hybrid.model.layers[index] = river[index]
    assert tokens == hf_greedy(hybrid, prompt)


def test_w4_equals_all_twins_model(family_model):
    _, model, engine, river = family_model
    prompt = prompt_ids(seed=4)
    tokens, exits = ours(engine, prompt, ExitPolicy(force_exit_layer=0), river)
    assert exits == [0] * NEW_TOKENS
    hybrid = copy.deepcopy(model)
    for index in range(engine.num_layers):
        hybrid.model.layers[index] = river[index]
    assert tokens == hf_greedy(hybrid, prompt)


def test_batch_with_left_padding_matches_transformers(family_model):
    _, model, engine, _ = family_model
    short, long = prompt_ids(5, seed=5), prompt_ids(11, seed=6)
    ids = torch.tensor([[0] * 6 + short, long])
    mask = torch.tensor([[0] * 6 + [1] * 5, [1] * 11])
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, 11:].tolist()
    events = list(decode(engine, [short, long], ExitPolicy(), None, 10))
    assert [[e.tokens[row] for e in events] for row in range(2)] == reference


def test_kv_cache_has_no_holes_whatever_the_exits(family_model):
    _, _, engine, river = family_model
    prompt = prompt_ids(9, seed=7)
    cache = engine.new_cache(1, len(prompt) + 24, track_filled=True)
    rng = torch.Generator().manual_seed(0)
    exit_at = torch.randint(0, engine.num_layers + 1, (25,), generator=rng).tolist()
    out = engine.forward(torch.tensor([prompt]), cache, ExitPolicy(force_exit_layer=exit_at[0]), river)
    assert out.exit_layer == exit_at[0] and cache.is_complete(len(prompt))
    seen = set()
    for step in range(24):
        slot = len(prompt) + step
        token = out.logits.argmax(-1, keepdim=True)
        out = engine.forward(token, cache, ExitPolicy(force_exit_layer=exit_at[step + 1]), river)
        seen.add(out.exit_layer)
        assert cache.is_complete(slot + 1), f"hole after step {step} (exit layer {out.exit_layer})"
        assert not cache.filled[:, :, slot + 1:].any()
        # Every layer's K at the newest slot is really written (not the zero it started as).
        assert all(bool(k[:, :, slot].abs().sum() > 0) for k in cache.keys)
    assert len(seen) > 3  # the mix of exits really was mixed


def test_kv_cache_has_no_holes_after_mixed_per_row_exits(family_model):
    """A batch whose rows leave at different layers in the same step: every row still has K/V
    at every layer for every slot it has filled (backbone or twin wrote them)."""
    _, _, engine, river = family_model
    prompts = [prompt_ids(n, seed=20 + n) for n in (3, 8, 12, 5)]
    sims = []
    for p in prompts:  # pick a tau between the rows' similarities so that they disagree
        cache = engine.new_cache(1, len(p))
        sims += [s.min().item() for s in engine.forward(torch.tensor([p]), cache, ExitPolicy(), river,
                                                        record_similarities=True).similarities[1:]]
    tau = sorted(sims)[len(sims) // 2]
    cache = engine.new_cache(len(prompts), 12 + 10, track_filled=True)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    out = engine.forward(ids, cache, ExitPolicy(tau=tau), river, counts=[len(p) for p in prompts])
    mixed = len(set(out.exit_layers)) > 1
    for _ in range(10):
        out = engine.forward(out.logits.argmax(-1, keepdim=True), cache, ExitPolicy(tau=tau), river)
        mixed |= len(set(out.exit_layers)) > 1
        for row in range(len(prompts)):
            assert cache.is_complete(cache.lengths[row], row)
    assert mixed  # rows really left at different layers in one step


def test_similarity_rule_uses_the_first_layer_above_tau(family_model):
    _, _, engine, river = family_model
    prompt = prompt_ids(1, seed=8)
    cache = engine.new_cache(1, 4)
    out = engine.forward(torch.tensor([prompt]), cache, ExitPolicy(), river, record_similarities=True)
    sims = [s.item() for s in out.similarities]
    assert len(sims) == engine.num_layers and all(-1 <= s <= 1 for s in sims)
    tau = sorted(sims[1:])[len(sims) // 2]  # a threshold some layers pass and some do not
    expected = next(layer for layer, s in enumerate(sims, 1) if layer > 1 and s > tau)
    cache = engine.new_cache(1, 4)
    out = engine.forward(torch.tensor([prompt]), cache, ExitPolicy(tau=tau), river)
    assert out.exit_layer == expected


def test_max_backbone_layers_forces_the_exit(family_model):
    _, _, engine, river = family_model
    _, exits = ours(engine, prompt_ids(seed=9), ExitPolicy(tau=1.5, max_backbone_layers=3), river, new_tokens=5)
    assert exits == [3] * 5


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_other_families_dense_and_river_match_transformers(family):
    model = tiny_model(family)
    engine = RiverEngine(model)
    river = build_river(engine.layers, QuantConfig())
    prompt = prompt_ids(seed=10)
    reference = hf_greedy(model, prompt)
    assert ours(engine, prompt, ExitPolicy())[0] == reference
    assert ours(engine, prompt, ExitPolicy(tau=1.5), river)[0] == reference
    tokens, exits = ours(engine, prompt, ExitPolicy(tau=-1.5), river)
    hybrid = copy.deepcopy(model)
    for index in range(2, engine.num_layers):
        hybrid.model.layers[index] = river[index]
    assert exits == [2] * NEW_TOKENS and tokens == hf_greedy(hybrid, prompt)


@pytest.mark.parametrize("last", [0, 2, 6])
def test_static_mix_runs_twins_first_and_the_last_layers_on_the_backbone(family_model, last):
    """`w4-last2`: the static mixed-precision control of the quality study (every token, prompt
    included, runs twins 1..L-2, then backbone layers L-1..L); exit_layers count backbone layers."""
    from riverllm.policy import Method

    _, model, engine, river = family_model
    method = Method.parse(f"w4-last{last}")
    assert (method.name, method.needs_river, method.uses_tau) == (f"w4-last{last}", True, False)
    tokens, exits = ours(engine, prompt_ids(seed=13), method.policy(0.9), river)
    assert exits == [last] * NEW_TOKENS
    hybrid = copy.deepcopy(model)
    for index in range(engine.num_layers - last):
        hybrid.model.layers[index] = river[index]
    assert tokens == hf_greedy(hybrid, prompt_ids(seed=13))


def test_static_mix_is_refused_where_it_cannot_run(family_model):
    from riverllm.errors import RiverError
    from riverllm.policy import Method

    _, _, engine, river = family_model
    with pytest.raises(RiverError, match="only 6 layers"):
        ours(engine, prompt_ids(seed=13), Method.parse("w4-last7").policy(0.9), river)
    with pytest.raises(RiverError, match="no exits"):
        ExitPolicy(tau=0.9, full_precision_last=2)
    with pytest.raises(RiverError, match="unknown method"):
        Method.parse("w4-last")


def test_static_depth_method_leaves_every_token_at_its_layer(family_model):
    """`river@K`: the static-depth control of the quality study (every token, prompt included,
    runs backbone layers 1..K, then the twins)."""
    from riverllm.policy import Method

    _, model, engine, river = family_model
    method = Method.parse("river@3")
    assert (method.name, method.needs_river, method.uses_tau) == ("river@3", True, False)
    assert Method.parse("river3@5").name == "river3@5" and Method.parse("river3@5").bits == 3
    tokens, exits = ours(engine, prompt_ids(seed=12), method.policy(0.9), river)
    assert exits == [3] * NEW_TOKENS
    hybrid = copy.deepcopy(model)
    for index in range(3, engine.num_layers):
        hybrid.model.layers[index] = river[index]
    assert tokens == hf_greedy(hybrid, prompt_ids(seed=12))


def test_attention_runs_in_float32_on_cpu_whatever_the_weights(family_model):
    """bfloat16 weights, float32 attention on a CPU (torch's bf16 CPU attention is 4-6x slower):
    the block's attention equals float32 attention over the same inputs, rounded once at the end."""
    _, _, engine, _ = family_model
    block = engine.blocks[0]
    generator = torch.Generator().manual_seed(0)
    shape = lambda heads, n: (2, heads, n, block.head_dim)  # noqa: E731
    q = torch.randn(shape(block.num_heads, 1), generator=generator).bfloat16()
    keys = torch.randn(shape(block.num_kv_heads, 9), generator=generator).bfloat16()
    values = torch.randn(shape(block.num_kv_heads, 9), generator=generator).bfloat16()
    out = block.attend(q, keys, values, None, False)
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), scale=block.scaling,
        enable_gqa=block.num_kv_heads != block.num_heads).bfloat16()
    assert torch.equal(out, reference.transpose(1, 2).reshape(2, 1, -1))
