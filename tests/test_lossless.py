"""Lossless River (engine/lossless.py): River drafts, the backbone verifies, and the output is the
dense model's.

Greedy: token-identical to dense decoding on tiny models of every family and on the real
SmolLM2, for drafts that are mostly accepted, mostly rejected, and in between; EOS and stop
strings inside a draft block, blocks that cross max-new-tokens, prompts near the context limit,
batches with per-row acceptance. The KV cache afterwards holds the backbone's K/V. Sampling: the
acceptance rule reproduces the target distribution (a statistical test), end to end too."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILIES, MORE_FAMILIES, tiny_model
from single_thread import one_thread  # noqa: F401  (rows of a batch are bit-stable with one thread)
from riverllm.engine import DraftConfig, DraftStats, RiverEngine, SamplingConfig, decode, decode_lossless
from riverllm.engine.lossless import Judge, lookup_drafts
from riverllm.errors import RiverError
from riverllm.policy import ExitPolicy
from riverllm.river import QuantConfig, build_river, low_bit_head

NEW_TOKENS = 20


def prompts_of(lengths, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(8, 320, (n,), generator=generator).tolist() for n in lengths]


def tokens_of(events, row: int = 0) -> list[int]:
    out = []
    for event in events:
        if event.present is None or event.present[row]:
            out.append(event.tokens[row])
        if event.finished[row]:
            break
    return out


def dense_tokens(engine, prompt, new_tokens=NEW_TOKENS, eos=()):
    return tokens_of(decode(engine, [prompt], ExitPolicy(), None, new_tokens, eos_token_ids=eos))


@pytest.fixture(scope="module", params=FAMILIES + MORE_FAMILIES)
def family(request):
    model = tiny_model(request.param)
    engine = RiverEngine(model)
    return engine, build_river(engine.layers, QuantConfig(bits=4, group_size=64))


# Draft policies from "never agrees" to "often agrees": leave after layer 1 whatever happens,
# leave on a low similarity, never leave (the draft is the backbone: every draft accepted).
DRAFTS = {"shallow": ExitPolicy(force_exit_layer=1), "tau": ExitPolicy(tau=0.5), "deep": ExitPolicy()}


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("max_drafts", [1, 3, 6])
def test_greedy_equals_dense(family, draft, max_drafts):
    engine, river = family
    for prompt in prompts_of((5, 17, 1), seed=3):
        stats = [DraftStats()]
        events = list(decode_lossless(engine, [prompt], DRAFTS[draft], river, NEW_TOKENS,
                                      drafting=DraftConfig(max_drafts), stats=stats))
        assert tokens_of(events) == dense_tokens(engine, prompt)
        assert stats[0].verifies < NEW_TOKENS or max_drafts == 1 or draft == "shallow"
        if draft == "deep":  # the draft is the backbone itself: all accepted
            assert stats[0].accepted == stats[0].drafted > 0


def test_eos_inside_a_block_and_blocks_crossing_the_budget(family):
    engine, river = family
    prompt = prompts_of((9,), seed=4)[0]
    reference = dense_tokens(engine, prompt)
    eos = reference[6]  # dense stops at its 7th token (or earlier, if the token came before)
    expected = reference[:reference.index(eos) + 1]
    for max_drafts in (2, 5):
        for new_tokens in (1, 2, 7, 11):
            events = list(decode_lossless(engine, [prompt], ExitPolicy(), river, new_tokens, eos_token_ids=(eos,),
                                          drafting=DraftConfig(max_drafts)))
            assert tokens_of(events) == expected[:new_tokens]
            assert events[-1].finished[0]


def test_prompt_near_the_context_limit(family):
    engine, river = family
    limit = engine.config.max_position_embeddings
    prompt = prompts_of((limit - 6,), seed=5)[0]
    events = list(decode_lossless(engine, [prompt], DRAFTS["tau"], river, 6, drafting=DraftConfig(4)))
    assert tokens_of(events) == dense_tokens(engine, prompt, 6)


def test_cache_holds_the_backbones_kv(family):
    engine, river = family
    prompt = prompts_of((7,), seed=6)[0]
    cache = engine.new_cache(1, len(prompt) + NEW_TOKENS)
    tokens = tokens_of(decode_lossless(engine, [prompt], DRAFTS["tau"], river, NEW_TOKENS, cache=cache,
                                       drafting=DraftConfig(4)))
    held = cache.lengths[0]
    assert held == len(prompt) + len(tokens) - 1  # the last token is never fed
    reference = engine.new_cache(1, held)
    engine.prefill([prompt + tokens[:-1]], reference, ExitPolicy())
    for layer in range(engine.num_layers):
        torch.testing.assert_close(cache.keys[layer][:, :, :held], reference.keys[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.values[layer][:, :, :held], reference.values[layer], rtol=1e-4, atol=1e-4)


def test_batch_rows_equal_their_single_runs(family):
    engine, river = family
    prompts = prompts_of((3, 12, 6, 9), seed=7)
    policy = DRAFTS["tau"]
    eos = dense_tokens(engine, prompts[1])[4]
    batched = list(decode_lossless(engine, prompts, policy, river, NEW_TOKENS, eos_token_ids=(eos,),
                                   drafting=DraftConfig(3)))
    for row, prompt in enumerate(prompts):
        alone = list(decode_lossless(engine, [prompt], policy, river, NEW_TOKENS, eos_token_ids=(eos,),
                                     drafting=DraftConfig(3)))
        assert tokens_of(batched, row) == tokens_of(alone) == dense_tokens(engine, prompt, eos=(eos,))


def test_low_bit_draft_head_and_confidence_stop_stay_exact(family):
    engine, river = family
    head = low_bit_head(engine.lm_head, 4, 64)
    for prompt in prompts_of((4, 13), seed=8):
        stats = [DraftStats()]
        events = decode_lossless(engine, [prompt], DRAFTS["tau"], river, NEW_TOKENS, drafting=DraftConfig(5, 0.5),
                                 draft_head=head, stats=stats)
        assert tokens_of(events) == dense_tokens(engine, prompt)
        assert stats[0].drafts_per_verify < 5  # unsure drafts stopped some cycles early


def test_lookup_drafts_copy_what_followed_the_latest_longest_match():
    context = [1, 2, 3, 9, 9, 7, 2, 3, 8, 5, 1, 2, 3]
    assert lookup_drafts(context, 2) == [9, 9]  # "1 2 3" occurred at 0 (the longest tail that recurs)
    assert lookup_drafts(context[:-1], 4) == [3, 9, 9, 7]  # only "1 2" recurs (at 0)
    assert lookup_drafts(context[:8], 3) == [9, 9, 7]  # "2 3": the latest earlier occurrence, at 1
    assert lookup_drafts([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert lookup_drafts([1, 2, 5, 1, 2, 6, 1, 2], 3) == [6, 1, 2]  # the latest of two earlier matches
    assert lookup_drafts([4, 6, 7, 5, 6], 3) == []  # only the single token 6 recurs: below the 2-token minimum
    assert lookup_drafts([4, 6, 7, 5, 6], 3, min_ngram=1) == [7, 5, 6]
    assert lookup_drafts([3, 3, 3], 5) == [3]  # the continuation may run into the tail itself
    assert lookup_drafts([7], 3) == []


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, as code and quoting answers do, so that prompt lookup finds matches."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        phrase = torch.randint(8, 320, (int(torch.randint(3, 9, (), generator=generator)),), generator=generator).tolist()
        prompts.append(phrase * 3 + phrase[:2])
    return prompts


@pytest.mark.parametrize("lookup_tokens", [1, 4, 9])
def test_prompt_lookup_drafts_stay_exact(family, lookup_tokens):
    engine, river = family
    looked_up = 0
    for prompt in repetitive_prompts(3, seed=11) + prompts_of((6,), seed=12):
        reference = dense_tokens(engine, prompt)
        eos = reference[5]
        stats = [DraftStats()]
        drafting = DraftConfig(3, lookup_tokens=lookup_tokens)
        events = list(decode_lossless(engine, [prompt], DRAFTS["tau"], river, NEW_TOKENS, drafting=drafting,
                                      stats=stats))
        assert tokens_of(events) == reference
        looked_up += stats[0].looked_up
        assert stats[0].looked_up_accepted <= stats[0].looked_up <= stats[0].drafted
        for new_tokens in (1, 3, 8):  # copied blocks that cross the budget or hold an EOS
            events = list(decode_lossless(engine, [prompt], DRAFTS["tau"], river, new_tokens, eos_token_ids=(eos,),
                                          drafting=drafting))
            assert tokens_of(events) == reference[:reference.index(eos) + 1][:new_tokens]
    assert looked_up > 0  # the repeated phrases were found


def test_prompt_lookup_batch_rows_and_cache_equal_dense(family):
    engine, river = family
    prompts = repetitive_prompts(2, seed=13) + prompts_of((4,), seed=14)
    drafting = DraftConfig(2, lookup_tokens=5)
    cache = engine.new_cache(len(prompts), max(map(len, prompts)) + NEW_TOKENS)
    batched = list(decode_lossless(engine, prompts, DRAFTS["shallow"], river, NEW_TOKENS, drafting=drafting,
                                   cache=cache))
    for row, prompt in enumerate(prompts):
        tokens = tokens_of(batched, row)
        assert tokens == tokens_of(decode_lossless(engine, [prompt], DRAFTS["shallow"], river, NEW_TOKENS,
                                                   drafting=drafting)) == dense_tokens(engine, prompt)
        held = cache.lengths[row]
        reference = engine.new_cache(1, held)
        engine.prefill([prompt + tokens[:-1]], reference, ExitPolicy())
        for layer in range(engine.num_layers):
            torch.testing.assert_close(cache.keys[layer][row:row + 1, :, :held], reference.keys[layer],
                                       rtol=1e-4, atol=1e-4)


def test_copied_draft_acceptance_reproduces_the_target_distribution():
    """A copied draft is a draft whose law is all mass on one token: accepted with probability
    p(token), else resampled from p without it, so the emitted token still follows p."""
    judge = Judge(SamplingConfig(temperature=1.0, seed=1), torch.device("cpu"))
    p_logits = torch.tensor([[0.5, 1.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(p_logits[0], dim=-1)
    draws = 20000
    counts = torch.zeros(4)
    for _ in range(draws):
        counts[judge.accept(p_logits, [2], [None])[0]] += 1
    chi2 = float((((counts - draws * p) ** 2) / (draws * p)).sum())
    assert chi2 < 16.3, (counts / draws, p)


def test_acceptance_rule_reproduces_the_target_distribution():
    """Speculative sampling: whatever the draft law q, accepted-or-resampled tokens follow p."""
    judge = Judge(SamplingConfig(temperature=1.0, seed=0), torch.device("cpu"))
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.softmax(torch.tensor([-1.0, 0.5, 2.0, 0.0]), dim=-1)
    p = torch.softmax(p_logits[0], dim=-1)
    draws = 20000
    counts = torch.zeros(4)
    for _ in range(draws):
        draft = int(torch.multinomial(q, 1, generator=judge.generator))
        counts[judge.accept(p_logits, [draft], [q])[0]] += 1
    chi2 = float((((counts - draws * p) ** 2) / (draws * p)).sum())
    assert chi2 < 16.3, (counts / draws, p)  # 3 degrees of freedom: p-value ~0.001


def test_sampling_end_to_end_matches_dense_distribution():
    """The second generated token's law under lossless sampling equals dense sampling's."""
    model = tiny_model("llama", seed=1)
    engine = RiverEngine(model)
    river = build_river(engine.layers, QuantConfig(bits=4, group_size=64))
    prompt = prompts_of((6,), seed=9)[0]
    sampling = dict(temperature=1.0, top_k=4)
    runs = 300

    def second_tokens(lossless: bool) -> torch.Tensor:
        counts = torch.zeros(320)
        for seed in range(runs):
            config = SamplingConfig(**sampling, seed=seed + (10_000 if lossless else 0))
            events = (decode_lossless(engine, [prompt], ExitPolicy(force_exit_layer=2), river, 2, config,
                                      drafting=DraftConfig(2))
                      if lossless else decode(engine, [prompt], ExitPolicy(), None, 2, config))
            tokens = tokens_of(events)
            counts[tokens[0] * 0 + tokens[1]] += 1
        return counts

    dense, lossless = second_tokens(False), second_tokens(True)
    support = (dense + lossless) > 0
    # Two-sample chi-square on the tokens either run produced.
    expected = (dense + lossless)[support] / 2
    chi2 = float((((dense[support] - expected) ** 2 + (lossless[support] - expected) ** 2) / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, (chi2, dof)


def test_api_lossless_equals_dense_on_smollm2(smollm2):
    prompts = ["What is 7 * 8?", "Write a haiku about rivers.", "def fib(n):"]
    for prompt in prompts:
        dense = smollm2.generate(prompt, method="dense", max_new_tokens=40)
        exact = smollm2.generate(prompt, method="lossless:0.9", max_new_tokens=40)
        assert exact.token_ids == dense.token_ids
        assert exact.text == dense.text
        drafting = exact.extra["drafting"]
        assert drafting["verifies"] < len(exact.token_ids)  # some drafts were accepted
        assert "exact" in exact.summary()
    batched = smollm2.generate_batch(prompts, method="lossless:0.9", max_new_tokens=40, draft_tokens=3)
    assert [r.token_ids for r in batched] == [smollm2.generate(p, method="dense", max_new_tokens=40).token_ids
                                              for p in prompts]


def test_api_drafts_by_prompt_lookup_by_default(smollm2):
    prompt = "Repeat exactly: the river runs to the sea, the river runs to the sea, the river runs to the sea."
    dense = smollm2.generate(prompt, method="dense", max_new_tokens=32)
    default = smollm2.generate(prompt, method="lossless", max_new_tokens=32)
    river_only = smollm2.generate(prompt, method="lossless", max_new_tokens=32, draft_lookup=0)
    assert default.token_ids == river_only.token_ids == dense.token_ids
    assert default.extra["drafting"]["looked_up"] > 0 == river_only.extra["drafting"]["looked_up"]
    assert default.extra["drafting"]["verifies"] < river_only.extra["drafting"]["verifies"]
    assert (default.extra["drafting"]["draft_lookup"], river_only.extra["drafting"]["draft_lookup"]) == (7, 0)


def test_api_stop_string_inside_a_draft_block(smollm2):
    prompt = "Count from one to ten in words, separated by commas."
    dense = smollm2.generate(prompt, method="dense", max_new_tokens=40)
    stop = dense.text.split(",")[2] if dense.text.count(",") >= 3 else dense.text[5:9]
    want = smollm2.generate(prompt, method="dense", max_new_tokens=40, stop=[stop])
    got = smollm2.generate(prompt, method="lossless:0.9", max_new_tokens=40, stop=[stop], draft_tokens=6)
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason)


@pytest.mark.parametrize("options, message", [
    (dict(method="river", draft_tokens=3), "lossless method only"),
    (dict(method="lossless", draft_tokens=0), "draft tokens must be between"),
    (dict(method="lossless", draft_confidence=1.5), "draft confidence"),
    (dict(method="river", draft_lookup=5), "lossless method only"),
    (dict(method="lossless", draft_lookup=99), "prompt-lookup drafts must be between"),
    (dict(method="river", head_bits=3), "low-bit LM head supports"),
    (dict(method="mask:0.9", head_bits=4), "low-bit LM head applies"),
])
def test_bad_draft_options(options, message):
    from riverllm.api import check_generation_options

    with pytest.raises(RiverError, match=message):
        check_generation_options(**options)


def test_exact_bench_compares_every_exact_method_with_dense(tmp_path):
    """`riverllm bench --exact` on SmolLM2: transformers' greedy generate, prompt lookup and lossless
    all reproduce our dense tokens; an interrupted run resumes without repeating a record."""
    import json

    from riverllm.bench.exact import ExactBenchSettings, exact_markdown, run_exact_bench

    settings = ExactBenchSettings(model="smollm2-135m",
                                  methods=("dense", "lossless:0.9", "lossless:0.9+lookup4", "hf", "hf-lookup"),
                                  tasks=("gsm8k",), num_prompts=2, new_tokens=24, threads=1)
    results = run_exact_bench(settings, tmp_path, progress=False)
    rows = {r["method"]: r for r in results["rows"]}
    for name in settings.methods:
        assert rows[name]["identical_to_dense"] == rows[name]["compared"] == 2, name
    assert 0 < rows["lossless:0.9"]["acceptance_rate"] <= 1
    assert rows["lossless:0.9"]["looked_up_share"] == 0 < rows["lossless:0.9+lookup4"]["looked_up_share"] <= 1
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 10
    (tmp_path / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as if killed after five records
    run_exact_bench(settings, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["prompt"], r["method"]) for r in records) == sorted(
        (f"gsm8k/{i}", m) for i in range(2) for m in settings.methods)
    assert "| lossless:0.9 | yes |" in exact_markdown(results) and "Weights in float32." in exact_markdown(results)
    # bfloat16 (what generate picks on a CPU with native bf16): still exact, and never mixed into
    # records taken in another dtype
    with pytest.raises(RiverError, match="taken in float32"):
        run_exact_bench(ExactBenchSettings(**{**vars(settings), "dtype": "bfloat16"}), tmp_path, progress=False)
    bf16 = ExactBenchSettings(**{**vars(settings), "dtype": "bfloat16", "methods": ("dense", "lossless:0.9", "hf")})
    rows = {r["method"]: r for r in run_exact_bench(bf16, tmp_path / "bf16", progress=False)["rows"]}
    assert all(rows[name]["identical_to_dense"] == 2 for name in ("lossless:0.9", "hf"))
    # ... nor into bf16 records of a riverllm whose CPU attention ran in bf16 (no attention_dtype)
    samples = tmp_path / "bf16" / "samples.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "attention_dtype"}
           for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps(r) + "\n" for r in old[:-1]))
    with pytest.raises(RiverError, match="attention ran in another dtype than float32"):
        run_exact_bench(bf16, tmp_path / "bf16", progress=False)


def test_teacher_forced_lossless_is_dense_and_the_low_bit_head_costs_little(smollm2):
    ids = smollm2.tokenizer("The river flows to the sea, and the sea is never full; to the place")["input_ids"]
    (dense, _), = smollm2.teacher_forced_batch([ids], [4], "dense")
    (exact, exits), = smollm2.teacher_forced_batch([ids], [4], "lossless:0.9")
    assert torch.equal(dense, exact) and set(exits) == {smollm2.num_layers}
    (low_bit, _), = smollm2.teacher_forced_batch([ids], [4], "dense", head_bits=4)
    assert not torch.equal(low_bit, dense)  # the 4-bit head really runs
    agree = (low_bit.argmax(-1) == dense.argmax(-1)).float().mean().item()
    assert agree >= 0.8, agree


def test_lookup_variant_applies_to_lossless_only():
    from riverllm.bench.exact import ExactBenchSettings

    with pytest.raises(RiverError, match=r"\+lookup applies to lossless methods only"):
        ExactBenchSettings(model="smollm2-135m", methods=("dense", "river:0.9+lookup")).check()


def test_default_drafts_follow_the_device_and_dtype(smollm2):
    """No profile: 2 River drafts in float32 on a CPU (a 4-row GEMM costs ~2 steps there), 4 in
    bfloat16 (flat for 1-8 rows); prompt lookup on with 7 drafts on a CPU."""
    from riverllm.api import DEFAULT_DRAFT_LOOKUP, DEFAULT_DRAFT_TOKENS

    saved = smollm2.profile_lossless
    smollm2.profile_lossless = {}
    try:
        expected = DEFAULT_DRAFT_TOKENS["cpu" if smollm2.engine.dtype == torch.float32 else "cpu-bf16"]
        assert smollm2.default_draft_tokens(4) == expected
        assert smollm2.default_draft_lookup() == DEFAULT_DRAFT_LOOKUP["cpu"] == 7
        assert DEFAULT_DRAFT_TOKENS["cpu"] == 2 and DEFAULT_DRAFT_TOKENS["cpu-bf16"] == 4
    finally:
        smollm2.profile_lossless = saved
