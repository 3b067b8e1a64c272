"""A batch is a set of independent requests: with per-row exits every row of a batch gets exactly
the tokens and exit layers it gets alone (tiny models of three families and the real SmolLM2).

Mixed batches: prompts of different lengths, rows that leave the backbone at different layers in
the same step, rows that finish early (EOS) while others go on, and seeded sampling (each row has
its own generator). The paper's batch-minimum rule (`exit_rule="batch-min"`) is kept as an option
and really does couple the rows.

One intra-op thread: with two, the BLAS splits the LM head's rows between threads differently
for different batch sizes, and a row's logits then differ in the last bit (docs/engine.md)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from single_thread import one_thread  # noqa: F401  (see the module docstring)
from riverllm.engine import RiverEngine, SamplingConfig, decode
from riverllm.errors import RiverError
from riverllm.policy import ExitPolicy
from riverllm.river import QuantConfig, build_river

EOS = 7
NEW_TOKENS = 14


def prompts_of(lengths, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(8, 320, (n,), generator=generator).tolist() for n in lengths]


def rows_of(events, batch: int, eos: int | None) -> list[tuple[list[int], list[int]]]:
    """Each row's (tokens, exit layers), up to and including its EOS."""
    rows = []
    for row in range(batch):
        tokens, exits = [], []
        for event in events:
            tokens.append(event.tokens[row])
            exits.append(event.exit_layers[row])
            if event.finished[row]:
                break
        rows.append((tokens, exits))
    return rows


def alone_and_batched(engine, river, prompts, policy, sampling, eos=(EOS,)):
    alone = [rows_of(list(decode(engine, [p], policy, river, NEW_TOKENS, sampling[i], eos)), 1, eos)[0]
             for i, p in enumerate(prompts)]
    batched = rows_of(list(decode(engine, prompts, policy, river, NEW_TOKENS, sampling, eos)), len(prompts), eos)
    return alone, batched


def spread_tau(engine, river, prompts) -> float:
    """A tau at which the rows' similarities disagree, so that rows leave at different layers:
    halfway between two neighbouring similarities (a tau equal to one of them would make that
    comparison a coin flip on the last bit, which no engine can promise to reproduce)."""
    sims = []
    for prompt in prompts:
        out = engine.forward(torch.tensor([prompt]), engine.new_cache(1, len(prompt)), ExitPolicy(), river,
                             record_similarities=True)
        sims += [s.min().item() for s in out.similarities[1:4]]
    sims = sorted(sims)
    middle = len(sims) // 2
    return (sims[middle] + sims[middle + 1]) / 2


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    engine = RiverEngine(model)
    return engine, build_river(engine.layers, QuantConfig(bits=4, group_size=64))


@pytest.mark.parametrize("sampled", [False, True])
def test_every_row_gets_what_it_gets_alone(family, sampled):
    engine, river = family
    prompts = prompts_of((3, 9, 14, 6, 11, 1), seed=11)
    policy = ExitPolicy(tau=spread_tau(engine, river, prompts))
    sampling = [SamplingConfig(temperature=0.9, top_k=50, seed=100 + i) if sampled else SamplingConfig()
                for i in range(len(prompts))]
    alone, batched = alone_and_batched(engine, river, prompts, policy, sampling)
    assert batched == alone
    exits = [e for _, row_exits in alone for e in row_exits[1:]]
    assert len(set(exits)) > 1, "the rows should leave at different layers"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_3_bit_river_keeps_every_row_what_it_gets_alone(dtype):
    """3-bit twins have no int4 kernel: their weights are kept dequantized (`keep_dequantized`) and
    multiplied as plain float layers, so through the same row-stable groups as the backbone (one
    float GEMM over the whole batch would give a row other bits than alone on some CPUs)."""
    from riverllm.river import keep_dequantized

    engine = RiverEngine(tiny_model("qwen2").to(dtype))
    river = build_river(engine.layers, QuantConfig(bits=3, group_size=64))
    assert keep_dequantized(river, dtype) > 0
    assert all(type(m) is torch.nn.Linear for weights in engine.twins(river) for m in weights.modules())
    prompts = prompts_of((3, 9, 14, 6, 11, 1, 5, 8), seed=13)
    policy = ExitPolicy(tau=spread_tau(engine, river, prompts))
    alone, batched = alone_and_batched(engine, river, prompts, policy, [SamplingConfig()] * len(prompts))
    assert batched == alone
    assert len({e for _, row_exits in alone for e in row_exits[1:]}) > 1, "the rows should leave at different layers"


def test_rows_finishing_early_leave_the_others_unchanged(family):
    engine, river = family
    prompts = prompts_of((5, 8, 12, 4), seed=12)
    policy = ExitPolicy(tau=spread_tau(engine, river, prompts))
    greedy = [SamplingConfig()] * len(prompts)
    # Pick as EOS a token that one row produces early: that row stops, the others go on.
    first_tokens = [tokens for tokens, _ in alone_and_batched(engine, river, prompts, policy, greedy, eos=())[0]]
    eos = first_tokens[1][2]
    alone, batched = alone_and_batched(engine, river, prompts, policy, greedy, eos=(eos,))
    assert batched == alone
    lengths = [len(tokens) for tokens, _ in alone]
    assert min(lengths) < NEW_TOKENS and max(lengths) == NEW_TOKENS


def test_batch_min_rule_couples_the_rows(family):
    """The paper's rule: every row of a step leaves at the same layer (the least settled row's)."""
    engine, river = family
    prompts = prompts_of((4, 10, 7), seed=13)
    tau = spread_tau(engine, river, prompts)
    events = list(decode(engine, prompts, ExitPolicy(tau=tau, exit_rule="batch-min"), river, 8))
    assert all(len(set(event.exit_layers)) == 1 for event in events[1:])  # prompts: one each
    per_row = list(decode(engine, prompts, ExitPolicy(tau=tau), river, 8))
    assert any(len(set(event.exit_layers)) > 1 for event in per_row[1:])
    # The first decoding step has the same inputs in both runs (prefill is per prompt either
    # way): the batch leaves there no earlier than its deepest row alone.
    assert events[1].exit_layers[0] >= max(per_row[1].exit_layers)


def test_smollm2_batch_rows_equal_their_single_runs(smollm2):
    prompts = ["What is 7 * 8?", "Write a haiku about rivers.", "Name three prime numbers.",
               "Explain recursion in one sentence.", "Hi!"]
    options = dict(method="river", tau=0.9, max_new_tokens=24)
    batched = smollm2.generate_batch(prompts, **options)
    for prompt, result in zip(prompts, batched):
        alone = smollm2.generate(prompt, **options)
        assert (result.token_ids, result.exit_layers) == (alone.token_ids, alone.exit_layers)
    assert len({e for r in batched for e in r.exit_layers}) > 1


def test_smollm2_seeded_sampling_is_batch_invariant(smollm2):
    prompts = ["Tell me a story.", "Give me a number."]
    options = dict(method="river", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    batched = smollm2.generate_batch(prompts, **options)
    assert [r.token_ids for r in batched] == [smollm2.generate(p, **options).token_ids for p in prompts]


def test_teacher_forced_batch_equals_single(smollm2):
    texts = ["The river flows to the sea and the sea", "def add(a, b):\n    return a + b\n\nprint(add(2,"]
    sequences = [smollm2.tokenizer(t)["input_ids"] for t in texts]
    batched = smollm2.teacher_forced_batch(sequences, [3, 5], "river", tau=0.9)
    for ids, prompt_len, (logits, exits) in zip(sequences, [3, 5], batched):
        alone_logits, alone_exits = smollm2.teacher_forced(ids, prompt_len, "river", tau=0.9)
        assert exits == alone_exits
        assert torch.equal(logits.argmax(-1), alone_logits.argmax(-1))
        torch.testing.assert_close(logits, alone_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (4864, 896), (896, 4864)])
def test_float_rows_get_their_batch_1_bits_at_every_row_count(shape, dtype):
    """Decoding's float32 projections give a row the same bits among any number of rows, on
    whatever CPU this runs: the row group is measured here (block.row_group), not assumed (an AMD
    EPYC switches kernels at 4 rows, the Intel machine the fixed group of 8 was measured on at 16;
    in bfloat16 the EPYC gives one row of a 4864-wide product other bits than 2 or more)."""
    from riverllm.engine.block import MAX_ROW_GROUP, row_group, stable_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0]).to(dtype)
    x = torch.randn(17, 1, shape[1]).to(dtype)
    with torch.no_grad():
        alone = [stable_rows(linear, x[r:r + 1]) for r in range(len(x))]
        for rows in range(1, len(x) + 1):
            batch = stable_rows(linear, x[:rows])
            assert all(torch.equal(batch[r:r + 1], alone[r]) for r in range(rows)), rows
    assert 1 <= row_group(linear).size <= MAX_ROW_GROUP


def test_row_group_takes_every_row_count_that_keeps_the_bits(monkeypatch):
    """A product whose every sum is exact in any order (zero weights: the bias alone) keeps its
    bits at every row count, so the measured group is the largest allowed."""
    from riverllm.engine import block

    monkeypatch.setattr(block, "ALONE_IF_PAIR_COSTS", float("inf"))  # no timing: groups only
    for dtype in (torch.float32, torch.bfloat16):
        linear = torch.nn.Linear(64, 48).to(dtype)
        torch.nn.init.zeros_(linear.weight)
        monkeypatch.delitem(block._row_groups, (torch.nn.Linear, 48, 64, torch.get_num_threads(), dtype), raising=False)
        assert block.row_group(linear).size == block.MAX_ROW_GROUP


def test_rows_alone_give_each_row_its_own_call(monkeypatch):
    """Group 1 (chosen where the CPU's matrix-vector kernel beats its two-row GEMM): every row is
    multiplied alone, so a batch's rows equal their single runs whatever the CPU's GEMMs do."""
    from riverllm.engine import block

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    monkeypatch.setitem(block._row_groups, (torch.nn.Linear, 40, 96, torch.get_num_threads(), torch.float32),
                       block.RowGroup(1))
    x = torch.randn(5, 1, 96)
    with torch.no_grad():
        batch = block.stable_rows(linear, x)
        assert all(torch.equal(batch[r:r + 1], linear(x[r:r + 1])) for r in range(5))


def test_batch_bench_in_bfloat16_keeps_rows_invariant():
    """`riverllm bench --batch-sizes --dtype bfloat16`: bf16 rows go through the measured row groups
    too, so a batched row still equals its batch-1 run; a bad dtype is refused before loading."""
    from riverllm.bench.batch import BatchBenchSettings, batch_markdown, run_batch_bench

    with pytest.raises(RiverError, match="--dtype must be"):
        BatchBenchSettings("smollm2-135m", dtype="float8").check()
    settings = BatchBenchSettings("smollm2-135m", batch_sizes=(1, 3), methods=("dense", "river:0.9"), num_prompts=3,
                                  new_tokens=3, check_tokens=8, dtype="bfloat16", threads=1)
    report = run_batch_bench(settings, progress=False)
    assert report["dtype"] == "bfloat16" and "Weights in bfloat16." in batch_markdown(report)
    assert [(i["method"], i["identical"]) for i in report["invariance"]] == [("dense", 3), ("river:0.9", 3)]
