"""The four prior ways of filling the KV hole (SPEC.md section 1), each tested for the property
that defines it, on a tiny random Llama and on Gemma3 (sliding windows)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from riverllm.engine import RiverEngine, decode
from riverllm.policy import ExitPolicy, Method

PROMPT = [5, 17, 33, 2, 91, 40, 7]


def step(engine, cache, token: int, slot: int, policy: ExitPolicy):
    assert cache.lengths[0] == slot
    return engine.forward(torch.tensor([[token]]), cache, policy)


def run_with_exits(engine, strategy: str, exits: list[int | None]):
    """Prefill at full depth, then one decoding step per entry of `exits` (None: full depth)."""
    cache = engine.new_cache(1, len(PROMPT) + len(exits) + 2, track_filled=True)  # room for a replayed step
    cache.prompt_lengths = [len(PROMPT)]
    out = engine.forward(torch.tensor([PROMPT]), cache, ExitPolicy(kv_strategy=strategy))
    outputs = []
    for offset, exit_layer in enumerate(exits):
        policy = ExitPolicy(force_exit_layer=exit_layer, kv_strategy=strategy) if exit_layer is not None else ExitPolicy(kv_strategy=strategy)
        out = step(engine, cache, 11 + offset, len(PROMPT) + offset, policy)
        outputs.append(out)
    return cache, outputs


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def engine(request):
    return RiverEngine(tiny_model(request.param, num_hidden_layers=6))


def test_mask_never_lets_a_later_token_see_a_skipped_layer(engine):
    # Token at slot 7 exits after layer 2: layers 3..6 hold nothing for it.
    cache, outputs = run_with_exits(engine, "mask", [2, None])
    exited = len(PROMPT)
    assert not cache.filled[2:, 0, exited].any() and cache.filled[:2, 0, exited].all()
    reference = outputs[1].logits.clone()
    # Poison the skipped slots with huge values and replay the later token: nothing may change.
    cache2, _ = run_with_exits(engine, "mask", [2])
    for layer in range(2, engine.num_layers):
        cache2.keys[layer][:, :, exited] = 1e4 * torch.randn_like(cache2.keys[layer][:, :, exited])
        cache2.values[layer][:, :, exited] = 1e4
    replay = step(engine, cache2, 12, exited + 1, ExitPolicy(kv_strategy="mask"))
    assert torch.equal(replay.logits, reference)
    # ...whereas a layer the token did run is seen: poisoning it changes the output.
    cache3, _ = run_with_exits(engine, "mask", [2])
    cache3.values[0][:, :, exited] = 1e4
    assert not torch.allclose(step(engine, cache3, 12, exited + 1, ExitPolicy(kv_strategy="mask")).logits, reference)


def test_exited_token_reads_the_lm_head_at_its_exit_layer(engine):
    _, outputs = run_with_exits(engine, "mask", [3])
    hidden = torch.tensor([PROMPT + [11]])
    states = engine.model(hidden, output_hidden_states=True).hidden_states
    expected = engine.head(states[3][:, -1:])[:, -1]
    assert torch.allclose(outputs[0].logits, expected, atol=1e-5)


def test_recompute_fills_the_hole_with_the_full_depth_values(engine):
    # EE-LLM: the exited token's deeper layers run later, batched with the next full-depth
    # token. Its K/V then equal those of a run in which it never exited.
    cache, _ = run_with_exits(engine, "recompute", [2, None])
    dense, _ = run_with_exits(engine, "river", [None, None])
    upto = len(PROMPT) + 2
    assert cache.is_complete(upto) and not cache.pending
    for layer in range(engine.num_layers):
        assert torch.allclose(cache.keys[layer][:, :, :upto], dense.keys[layer][:, :, :upto], atol=1e-4)
        assert torch.allclose(cache.values[layer][:, :, :upto], dense.values[layer][:, :, :upto], atol=1e-4)


def test_recompute_keeps_owing_until_a_deep_enough_token_comes(engine):
    cache, _ = run_with_exits(engine, "recompute", [2, 4])
    first, second = len(PROMPT), len(PROMPT) + 1
    # The second token ran layers 1-4 and took the first along for layers 3-4.
    assert cache.filled[:4, 0, first].all() and not cache.filled[4:, 0, first].any()
    assert cache.filled[:4, 0, second].all() and not cache.filled[4:, 0, second].any()
    assert sorted(p.next_layer for p in cache.pending) == [4, 4]


def test_propagate_writes_kv_projected_from_the_exit_state(engine):
    cache, _ = run_with_exits(engine, "propagate", [2])
    slot = len(PROMPT)
    assert cache.is_complete(slot + 1)  # no hole: every skipped layer got K/V
    # Layer 5's K/V at that slot are its k/v projections (with its norm and RoPE) of the
    # exit-layer state, computed here with transformers' own modules.
    states = engine.model(torch.tensor([PROMPT + [11]]), output_hidden_states=True).hidden_states
    attn = engine.layers[4].self_attn
    normed = engine.layers[4].input_layernorm(states[2][:, -1:])
    key = attn.k_proj(normed).view(1, 1, -1, engine.head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(1, 1, -1, engine.head_dim).transpose(1, 2)
    if getattr(attn, "k_norm", None) is not None:
        key = attn.k_norm(key)
    cos, sin = engine.rotary(normed, torch.tensor([[slot]]))[engine.layer_types[4]]
    half = engine.head_dim // 2
    key = key * cos[:, None] + torch.cat((-key[..., half:], key[..., :half]), dim=-1) * sin[:, None]
    assert torch.allclose(cache.keys[4][:, :, slot], key[:, :, 0], atol=1e-5)
    assert torch.allclose(cache.values[4][:, :, slot], value[:, :, 0], atol=1e-5)


def test_monotonic_depth_never_grows_and_no_token_needs_a_skipped_layer(engine):
    method = Method.parse("monotonic:6-2@6")
    events = list(decode(engine, [PROMPT], method.policy(0.9), None, 10))
    depths = [e.exit_layer for e in events]
    assert depths[0] == engine.num_layers  # the prompt (and so the first token) runs full depth
    assert depths == sorted(depths, reverse=True) and depths[-1] == 2
    assert len(set(depths)) > 2


def test_monotonic_never_attends_to_a_hole():
    engine = RiverEngine(tiny_model("llama", num_hidden_layers=6))
    policy = Method.parse("monotonic:6-2@6").policy(0.9)
    cache = engine.new_cache(1, len(PROMPT) + 12, track_filled=True)
    cache.prompt_lengths = [len(PROMPT)]
    out = engine.forward(torch.tensor([PROMPT]), cache, policy)
    for t in range(10):
        slot = len(PROMPT) + t
        out = step(engine, cache, int(out.logits.argmax()), slot, policy)
        # Every layer this token ran holds K/V for every earlier slot.
        assert cache.filled[: out.exit_layer, 0, : slot + 1].all()
