"""River-LLM on the real SmolLM2-135M-Instruct (30 layers), against transformers' `generate`."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from riverllm.engine.block import ALL_BACKBONE, ALL_TWIN
from riverllm.engine import decode
from riverllm.policy import ExitPolicy

PROMPT = "Write a Python function that returns the sum of a list of numbers."
NEW_TOKENS = 24


def hf_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=-1)
    return out[0, len(ids):].tolist()


def greedy(lm, ids, policy, river=None):
    events = list(decode(lm.engine, [ids], policy, river, NEW_TOKENS))
    return [e.tokens[0] for e in events], [e.exit_layer for e in events]


def test_dense_and_never_exiting_river_equal_transformers(smollm2):
    ids = smollm2.encode(PROMPT)
    reference = hf_greedy(smollm2.model, ids)
    assert greedy(smollm2, ids, ExitPolicy())[0] == reference
    tokens, exits = greedy(smollm2, ids, ExitPolicy(tau=1.5), smollm2.river())
    assert tokens == reference and exits == [30] * NEW_TOKENS


def test_always_exiting_river_equals_backbone_prefix_plus_twins(smollm2):
    ids = smollm2.encode(PROMPT)
    river = smollm2.river()
    tokens, exits = greedy(smollm2, ids, ExitPolicy(tau=-1.5), river)
    assert exits == [2] * NEW_TOKENS
    hybrid = copy.copy(smollm2.model)  # shallow: share weights, swap the layer list
    hybrid.model = copy.copy(smollm2.model.model)
    hybrid.model.layers = torch.nn.ModuleList(list(smollm2.engine.layers[:2]) + list(river[2:]))
    assert tokens == hf_greedy(hybrid, ids)


def test_generation_api_reports_exits_and_timings(smollm2):
    result = smollm2.generate(PROMPT, method="river", tau=0.9, max_new_tokens=16)
    assert len(result.token_ids) == len(result.exit_layers) == len(result.token_times) <= 16
    assert all(2 <= layer <= 30 for layer in result.exit_layers)
    assert result.text and result.tokens_per_s > 0 and 0 < result.full_precision_share <= 1
    assert result.finish_reason in ("stop", "length")
    # The default tau exits early on most tokens of this model (SPEC.md section 2: ~3 of 30 layers).
    assert result.mean_exit_layer < 15


def test_twin_kv_is_close_to_the_backbone_kv(smollm2):
    """Paper: the twins' K/V have cosine > 0.97 with the backbone's for the same input."""
    ids = torch.tensor([smollm2.encode(PROMPT)])
    engine, river = smollm2.engine, smollm2.river()
    states = smollm2.model(ids, output_hidden_states=True).hidden_states  # inputs of each layer
    cos, sin = engine.rotary(states[0], torch.arange(ids.shape[1])[None])["full_attention"]
    twins = engine.twins(river)
    for index in range(engine.num_layers):
        block = engine.blocks[index]
        _, backbone_k, backbone_v = block.qkv(states[index], ALL_BACKBONE, engine.backbone[index], None, cos, sin)
        _, twin_k, twin_v = block.qkv(states[index], ALL_TWIN, None, twins[index], cos, sin)
        for backbone, twin in ((backbone_k, twin_k), (backbone_v, twin_v)):
            cosine = F.cosine_similarity(backbone.flatten(2).transpose(1, 2).reshape(-1, backbone.shape[-1]),
                                         twin.flatten(2).transpose(1, 2).reshape(-1, twin.shape[-1]), dim=-1)
            assert cosine.mean() > 0.97, f"layer {index + 1}: mean K/V cosine {cosine.mean():.3f}"


def test_batch_generation_with_left_padding_matches_single(smollm2):
    prompts = ["Hi!", "What is the capital of France? Answer in one word."]
    batch = smollm2.generate_batch(prompts, method="dense", max_new_tokens=8)
    for prompt, result in zip(prompts, batch):
        assert result.token_ids == smollm2.generate(prompt, method="dense", max_new_tokens=8).token_ids


def test_stop_strings_and_streaming(smollm2):
    full = smollm2.generate("Count from 1 to 10, separated by commas.", method="dense", max_new_tokens=30)
    assert "4" in full.text
    stopped = smollm2.generate("Count from 1 to 10, separated by commas.", method="dense", max_new_tokens=30,
                               stop=["4"])
    assert stopped.finish_reason == "stop" and "4" not in stopped.text and full.text.startswith(stopped.text)
    events = list(smollm2.stream("Count from 1 to 10, separated by commas.", method="dense", max_new_tokens=30))
    assert "".join(e.text for e in events) == full.text and events[-1].result.text == full.text


def test_seeded_sampling_is_reproducible(smollm2):
    options = dict(method="river", max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    first, second = smollm2.generate("Tell me a story.", **options), smollm2.generate("Tell me a story.", **options)
    assert first.token_ids == second.token_ids
    other = smollm2.generate("Tell me a story.", **{**options, "seed": 8})
    greedy_ids = smollm2.generate("Tell me a story.", method="river", max_new_tokens=12).token_ids
    assert other.token_ids != first.token_ids or first.token_ids != greedy_ids
