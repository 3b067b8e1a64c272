"""The CUDA-graph decoding path (engine/cuda_graphs.py) against the eager engine.

On CPU the GraphRunner runs its static-buffer steps (full-length KV cache, masks over all slots,
in-place position/RoPE/mask buffers, per-layer exit reads, per-exit suffixes) without capturing
them; these tests check that logic token by token against `RiverEngine.forward`. The capture
itself needs a GPU: the tests marked `gpu` run the same comparisons on CUDA (pytest -m gpu).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from single_thread import one_thread  # noqa: F401  (one intra-op thread: steadier on a shared CPU)
from riverllm.engine import RiverEngine, decode
from riverllm.engine.cuda_graphs import GraphRunner, graph_runner
from riverllm.policy import ExitPolicy, Method
from riverllm.river import QuantConfig, build_river

NEW_TOKENS = 12


def prompt_ids(n: int, seed: int, vocab: int = 320) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine, prompts, policy, river, graphs: bool, new_tokens: int = NEW_TOKENS):
    events = list(decode(engine, prompts, policy, river, new_tokens, use_cuda_graphs=graphs))
    return [e.tokens for e in events], [e.exit_layers for e in events]


def mixed_tau(engine, river, prompt) -> float:
    """A threshold under which the exits of the generated tokens really vary (several layers)."""
    cache = engine.new_cache(1, len(prompt))
    out = engine.forward(torch.tensor([prompt], device=engine.device), cache, ExitPolicy(), record_similarities=True)
    sims = sorted(torch.cat([s[0] for s in out.similarities[1:]]).tolist())
    candidates = [sims[int(q * (len(sims) - 1))] for q in (0.5, 0.3, 0.7, 0.2, 0.8, 0.9)]
    spread = {tau: len({e[0] for e in run(engine, [prompt], ExitPolicy(tau=tau), river, graphs=False)[1]})
              for tau in candidates}
    return max(candidates, key=lambda tau: spread[tau])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    engine = RiverEngine(model)
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    engine.test_tau = mixed_tau(engine, river, prompt_ids(10, seed=1))  # found once per family
    return engine, river


def make_policy(name: str, engine, river, prompt) -> ExitPolicy:
    if name == "river":
        return ExitPolicy(tau=getattr(engine, "test_tau", None) or mixed_tau(engine, river, prompt))
    return {
        "dense": ExitPolicy(),
        "w4": ExitPolicy(force_exit_layer=0),
        "forced@3": ExitPolicy(force_exit_layer=3),
        "river-max3": ExitPolicy(tau=1.5, max_backbone_layers=3),
    }[name]


@pytest.mark.parametrize("name", ["dense", "w4", "river", "forced@3", "river-max3"])
def test_static_path_matches_eager(family, name):
    engine, river = family
    prompt = prompt_ids(10, seed=1)
    policy = make_policy(name, engine, river, prompt)
    eager = run(engine, [prompt], policy, river, graphs=False)
    static = run(engine, [prompt], policy, river, graphs=True)
    assert static == eager
    if name == "river":
        assert len({e[0] for e in eager[1]}) > 1, "tau should give a mix of exit layers"


@pytest.mark.parametrize("name", ["dense", "river", "river-batch-min"])
def test_static_path_with_batch_of_different_lengths(family, name):
    """Rows of different lengths, exiting at different layers ("blend" steps): the static path
    gives every row the eager engine's tokens and exits."""
    engine, river = family
    prompts = [prompt_ids(4, seed=2), prompt_ids(11, seed=3), prompt_ids(7, seed=4)]
    if name == "river-batch-min":
        policy = ExitPolicy(tau=engine.test_tau, exit_rule="batch-min")
    else:
        policy = make_policy(name, engine, river, prompts[1])
    static = run(engine, prompts, policy, river, graphs=True)
    assert static == run(engine, prompts, policy, river, graphs=False)
    if name == "river":
        assert any(len(set(step)) > 1 for step in static[1]), "rows should leave at different layers"


def test_static_logits_and_similarities_match_eager_step(family):
    engine, river = family
    prompt = prompt_ids(9, seed=4)
    runner = GraphRunner(engine, batch_size=1, max_len=32, use_graphs=False)
    cache = engine.new_cache(1, 32, track_filled=True)
    runner.cache = engine.new_cache(1, 32, track_filled=True)
    policy = ExitPolicy(tau=0.5)
    for ids in (torch.tensor([prompt]), torch.tensor([[7]]), torch.tensor([[11]])):
        eager = engine.forward(ids, cache, policy, river, record_similarities=True)
        static = runner.forward(ids, runner.cache, policy, river, record_similarities=True)
        assert static.exit_layers == eager.exit_layers
        # The static path attends over all 32 slots (masked), the eager one over the visible ones:
        # sums in another order, ~1e-7 apart, which the twins' bf16 activations can round apart
        # by one bf16 step (~4e-3 relative) before their int4 matmul.
        torch.testing.assert_close(static.logits, eager.logits, rtol=1e-2, atol=5e-3)
        assert len(static.similarities) == len(eager.similarities)
        for a, b in zip(static.similarities, eager.similarities):
            torch.testing.assert_close(a[:, -1:], b[:, -1:], rtol=1e-5, atol=1e-5)
    # The static cache holds the same K/V as the eager one, and has no holes.
    visible = len(prompt) + 2
    assert runner.cache.is_complete(visible) and not runner.cache.filled[:, :, visible:].any()
    for j in range(engine.num_layers):
        torch.testing.assert_close(runner.cache.keys[j][:, :, :visible], cache.keys[j][:, :, :visible],
                                   rtol=1e-2, atol=2e-2)  # twins' K/V: see the bf16 note above


def test_exit_rule_reads_one_float_per_deciding_layer(family):
    engine, river = family
    prompt = prompt_ids(8, seed=5)
    policy = ExitPolicy(tau=engine.test_tau, min_exit_layer=1)
    events = list(decode(engine, [prompt], policy, river, NEW_TOKENS, use_cuda_graphs=True))
    runner = engine._graph_runner
    # Decoding steps (not the eager prefill) read layers 2..exit: exit - 1 floats each.
    assert runner.similarity_reads == sum(e.exit_layers[0] - 1 for e in events[1:])
    # Dense and forced exits read nothing.
    before = runner.similarity_reads
    list(decode(engine, [prompt], ExitPolicy(), None, 4, use_cuda_graphs=True))
    list(decode(engine, [prompt], ExitPolicy(force_exit_layer=2), river, 4, use_cuda_graphs=True))
    assert engine._graph_runner.similarity_reads == before


def test_runner_is_reused_and_rebuilt_when_stale():
    engine = RiverEngine(tiny_model("llama", seed=3))
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    prompt = prompt_ids(6, seed=6)
    first = run(engine, [prompt], ExitPolicy(tau=0.5), river, graphs=True)
    runner = engine._graph_runner
    again = run(engine, [prompt], ExitPolicy(tau=0.5), river, graphs=True)
    assert engine._graph_runner is runner and again == first  # reset between generations
    assert graph_runner(engine, 1, 300) is not runner  # longer than its 256 slots: a new one
    assert engine._graph_runner.max_len == 512
    stale = engine._graph_runner
    engine.layers[5] = torch.nn.Identity()  # what RiverLM.free_backbone does
    engine.free_layers(5)
    assert not stale.matches(engine) and graph_runner(engine, 1, 20) is not stale
    limited = run(engine, [prompt], ExitPolicy(tau=0.5, max_backbone_layers=5), river, graphs=True)
    assert limited == run(engine, [prompt], ExitPolicy(tau=0.5, max_backbone_layers=5), river, graphs=False)


def test_prior_kv_strategies_fall_back_to_eager():
    engine = RiverEngine(tiny_model("qwen2", seed=4))
    prompt = prompt_ids(7, seed=7)
    policy = Method.parse("mask:0.5").policy(0.5)
    assert run(engine, [prompt], policy, None, graphs=True) == run(engine, [prompt], policy, None, graphs=False)


# --- on a GPU (pytest -m gpu) -------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("name", ["dense", "w4", "river", "forced@3"])
def test_cuda_graphs_match_eager_on_tiny_models(family_name, name):
    # float32 activations: eager and graph paths pick different attention kernels (flash without a
    # mask, memory-efficient with one); in float32 their rounding differences cannot flip a token.
    engine = RiverEngine(tiny_model(family_name).cuda())
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    assert all(m.backend == "int4_cuda" for m in river.modules() if hasattr(m, "backend"))
    prompt = prompt_ids(10, seed=1)
    policy = make_policy(name, engine, river, prompt)
    eager = run(engine, [prompt], policy, river, graphs=False, new_tokens=24)
    graphs = run(engine, [prompt], policy, river, graphs=True, new_tokens=24)
    assert engine._graph_runner.use_graphs and engine._graph_runner.steps
    assert graphs == eager


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["dense", "w4", "river:0.9"])
def test_cuda_graphs_match_eager_on_smollm2(method):
    import riverllm

    lm = riverllm.load("smollm2-135m", device="cuda", dtype=torch.float32, progress=False)
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    options = dict(method=method, max_new_tokens=64, ignore_eos=True)
    eager = lm.generate(prompt, **options)
    graphs = lm.generate(prompt, use_cuda_graphs=True, **options)
    assert lm.engine._graph_runner.use_graphs
    assert graphs.token_ids == eager.token_ids
    assert graphs.exit_layers == eager.exit_layers


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_bf16_smollm2_teacher_forced_agreement():
    """In bfloat16 the two attention kernels round differently; fed the same tokens, the graph
    path must still pick the eager path's argmax almost everywhere and take the same exits."""
    import riverllm

    lm = riverllm.load("smollm2-135m", device="cuda", dtype=torch.bfloat16, progress=False)
    text = "Explain how a hash map works, step by step."
    prompt = lm.encode(text)
    eager = lm.generate(text, method="dense", max_new_tokens=96, ignore_eos=True)
    engine = lm.engine
    runner = graph_runner(engine, 1, len(prompt) + len(eager.token_ids))
    cache = engine.new_cache(1, len(prompt) + len(eager.token_ids))
    policy = ExitPolicy()
    engine.forward(torch.tensor([prompt], device="cuda"), cache, policy)
    runner.forward(torch.tensor([prompt], device="cuda"), runner.cache, policy)
    agree = 0
    for token in eager.token_ids[:-1]:
        ids_t = torch.tensor([[token]], device="cuda")
        eager_out = engine.forward(ids_t, cache, policy)
        graph_out = runner.forward(ids_t, runner.cache, policy)
        agree += int(eager_out.logits.argmax() == graph_out.logits.argmax())
    assert agree >= 0.95 * (len(eager.token_ids) - 1)
