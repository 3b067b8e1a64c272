"""The ggml kernels (riverllm.kernels): GGUF blocks multiplied by llama.cpp's code. Most tests need
llama-cpp-python (the `ggml` extra, which .ci/run installs)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from riverllm.errors import RiverError
from riverllm.kernels import ggml
from riverllm.river.quant import QuantLinear

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the ggml extra) is not installed")


def smollm2_gguf():
    from riverllm.loading import resolve_model

    directory, name = resolve_model("smollm2-135m", progress=False)
    return directory / name


@needs_ggml
def test_quant_matrix_matches_the_dequantized_product():
    """Each GGUF format of the packaged models against its dequantized float32 product: equal up to
    ggml's 8-bit quantization of the activations."""
    reader = GGUFReader(str(smollm2_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    rows = np.ascontiguousarray(tensor.data)
    weight = torch.from_numpy(dequantize(rows, tensor.tensor_type).reshape(-1, int(tensor.shape[0])).copy())
    matrix = ggml.QuantMatrix.of(rows, int(tensor.tensor_type), weight.shape[1])
    x = torch.randn(3, weight.shape[1])
    got, expected = matrix.matmul(x), x @ weight.t()
    assert got.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() > 0.999
    # One row alone gives the bits it gets among others (what lossless verification relies on).
    assert torch.equal(matrix.matmul(x[1:2]), got[1:2])


def random_blocks(ggml_type: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any layout: random bytes, with the block's float16 scale fields set to
    small finite values (d and dmin / m first in Q4_K and Q4_1, d last in Q6_K, d first otherwise)."""
    from gguf.constants import GGML_QUANT_SIZES

    block_weights, block_bytes = GGML_QUANT_SIZES[ggml_type]
    generator = np.random.default_rng(seed)
    blocks = generator.integers(0, 256, (rows, columns // block_weights, block_bytes), dtype=np.uint8)
    offsets = {GGMLQuantizationType.Q4_K: [0, 2], GGMLQuantizationType.Q4_1: [0, 2],
               GGMLQuantizationType.Q6_K: [block_bytes - 2]}.get(ggml_type, [0])
    for offset in offsets:
        scale = generator.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


@needs_ggml
@pytest.mark.parametrize("ggml_type", [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K,
                                       GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0,
                                       GGMLQuantizationType.Q4_1])
def test_a_row_gets_the_same_bits_at_every_row_count(ggml_type):
    """ggml switches K-quant products to a tiled kernel at 8+ rows unless told not to (its
    'use_ref' mode, which riverllm sets): rows must not depend on how many come along."""
    blocks = random_blocks(ggml_type, 64, 512)
    matrix = ggml.QuantMatrix.of(blocks, int(ggml_type), 512)
    # Q4_K runs on ggml's repacked layout where the build has it: its multi-row kernel rounds
    # otherwise than its one-row one, so such a matrix is multiplied a row at a time.
    repacks = int(ggml_type) in ggml.REPACK_TYPES and ggml.load().repack_buffer_type is not None
    assert matrix.parts[0].repacked == repacks
    x = torch.randn(16, 512)
    together = matrix.matmul(x)
    for rows in range(1, 17):
        assert torch.equal(matrix.matmul(x[:rows]), together[:rows]), f"{rows} rows"
    weight = torch.from_numpy(dequantize(blocks, ggml_type).reshape(64, 512).copy())
    assert torch.nn.functional.cosine_similarity(together, x @ weight.t(), dim=-1).min() > 0.99


@needs_ggml
def test_a_fused_product_equals_its_matrices_alone():
    """q/k/v (and gate/up) run as one ggml graph: each part's result, at every row count, must be
    bit for bit what its matrix gives alone, so fusing changes speed and never tokens."""
    types = [GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K]
    alone = [ggml.QuantMatrix.of(random_blocks(t, rows, 512, seed), int(t), 512)
             for seed, (t, rows) in enumerate(zip(types, (64, 32, 96)))]
    fused = ggml.QuantMatrix([matrix.parts[0] for matrix in alone])
    assert (fused.out_features, fused.nbytes) == (192, sum(matrix.nbytes for matrix in alone))
    x = torch.randn(16, 512)
    for rows in (1, 2, 5, 16):
        assert torch.equal(fused.matmul(x[:rows]), torch.cat([matrix.matmul(x[:rows]) for matrix in alone], dim=1))
    with pytest.raises(RiverError, match="input width"):
        ggml.QuantMatrix([alone[0].parts[0], ggml.QuantBlocks(random_blocks(types[0], 8, 256), int(types[0]), 256)])


@needs_ggml
def test_quant_matrix_refuses_mismatched_blocks():
    with pytest.raises(RiverError, match="bytes"):
        ggml.QuantMatrix.of(np.zeros((4, 10), dtype=np.uint8), ggml.GGML_Q8_0, 64)


@pytest.fixture(scope="module")
def smollm2_ggml():
    import riverllm

    lm = riverllm.load("smollm2-135m", progress=False, kernels="ggml")
    yield lm
    lm.use_kernels("torch")


PROMPTS = ["What is the capital of France?", "Write a haiku about rivers.", "List three prime numbers."]


@needs_ggml
def test_ggml_dense_scores_like_the_dequantized_model(smollm2_ggml):
    """Same weights, other arithmetic: teacher-forced next-token predictions agree with the float32
    path nearly everywhere (a wrong q/k row permutation or a misread block would not)."""
    lm = smollm2_ggml
    ids = lm.encode(PROMPTS[1])
    lm.use_kernels("torch")
    continuation = lm.generate(PROMPTS[1], method="dense", max_new_tokens=48).token_ids
    sequence = ids + continuation
    reference, _ = lm.teacher_forced(sequence, len(ids), method="dense")
    lm.use_kernels("ggml")
    logits, _ = lm.teacher_forced(sequence, len(ids), method="dense")
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert agree >= 0.95 and kl < 0.05, (agree, kl)


@needs_ggml
@pytest.mark.parametrize("prompt", PROMPTS)
def test_lossless_on_ggml_equals_dense_on_ggml(smollm2_ggml, prompt):
    """Verification runs k + 1 rows through the same ggml products a dense step runs one row
    through, and gets the same bits: lossless stays exact on these kernels."""
    lm = smollm2_ggml
    dense = lm.generate(prompt, method="dense", max_new_tokens=40)
    lossless = lm.generate(prompt, method="lossless:0.9", max_new_tokens=40, draft_tokens=3)
    assert lossless.token_ids == dense.token_ids
    assert lossless.extra["drafting"]["accepted"] > 0


@needs_ggml
def test_ggml_batch_rows_equal_their_batch_1_runs(smollm2_ggml):
    lm = smollm2_ggml
    batch = lm.generate_batch(PROMPTS, method="river:0.9", max_new_tokens=24)
    for prompt, result in zip(PROMPTS, batch):
        alone = lm.generate(prompt, method="river:0.9", max_new_tokens=24)
        assert result.token_ids == alone.token_ids
        assert result.exit_layers == alone.exit_layers


@needs_ggml
def test_ggml_kernels_switch_back_and_name_themselves(smollm2_ggml):
    lm = smollm2_ggml
    assert "ggml kernels" in lm.generate("Hi", method="river:0.9", max_new_tokens=3).compute
    lm.use_kernels("torch")
    assert "ggml" not in lm.generate("Hi", method="river:0.9", max_new_tokens=3).compute
    lm.use_kernels("ggml")


def test_ggml_kernels_refuse_what_they_cannot_run(smollm2):
    with pytest.raises(RiverError, match="kernels must be one of"):
        smollm2.use_kernels("mkl")
    if ggml.available():
        with pytest.raises(RiverError, match="GGUF models on the CPU only"):
            smollm2.use_kernels("ggml")  # built from a loaded model object: no GGUF file known


def test_bench_method_variants_parse():
    from riverllm.bench.batch import split_method

    assert split_method("dense") == ("dense", "torch", {})
    assert split_method("river:0.9+ggml+head4") == ("river:0.9", "ggml", {"head_bits": 4})
    with pytest.raises(RiverError, match=r"\+fast"):
        split_method("dense+fast")
    from riverllm.bench.batch import BatchBenchSettings, method_options

    assert method_options("river:0.9@batch-min+ggml") == ("ggml", dict(method="river:0.9", exit_rule="batch-min"))
    assert method_options("w4") == ("torch", dict(method="w4", exit_rule="per-row"))
    assert method_options("river3@8+ggml") == ("ggml", dict(method="river3@8", exit_rule="per-row"))  # a method
    with pytest.raises(RiverError, match=r"\+fast"):
        BatchBenchSettings("smollm2-135m", methods=("river:0.9+fast",)).check()


@needs_ggml
def test_llamacpp_bench_runs_resumes_and_compares(tmp_path):
    """`riverllm bench --llama-cpp` end to end on SmolLM2: llama.cpp through llama-cpp-python, our
    dense on ggml, per-prompt records, a resumed run that adds nothing."""
    from riverllm.bench.llamacpp import LlamaCppBenchSettings, run_llamacpp_bench

    settings = LlamaCppBenchSettings(model="smollm2-135m", methods=("llama.cpp", "dense", "dense+ggml"),
                                     threads=(1,), tasks=("gsm8k",), num_prompts=2, new_tokens=8)
    results = run_llamacpp_bench(settings, tmp_path, progress=False)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"llama.cpp", "dense", "dense+ggml"}
    for row in rows.values():
        assert row["prompts"] == 2 and row["decode_tokens_per_s"] > 0
    assert rows["llama.cpp"]["vs_llama_cpp"] == 1.0
    # The same file and the same kernels: llama.cpp and our ggml dense agree on a short answer.
    assert rows["dense+ggml"]["prefix_with_llama.cpp"] > 0.5
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6
    run_llamacpp_bench(settings, tmp_path, progress=False)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 6


def test_bench_llama_cpp_needs_a_model():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from riverllm.cli import main; main()", "bench", "--llama-cpp"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--llama-cpp needs --model" in proc.stderr


@needs_ggml
def test_ggml_leaves_the_twins_on_the_int4_kernel(smollm2_ggml):
    """Backbone and head move onto ggml, q/k/v and gate/up fused (one ggml graph each); 4- and
    3-bit twins and the low-bit head keep their PyTorch modules for decoding (the int4 kernel beats
    ggml's Q4_1 here: docs/kernels.md), in the same fused layout. Prompts take copies of the same
    weights in PyTorch's fastest dtype, backbone and twins alike."""
    from riverllm.cpu import fast_cpu_dtype
    from riverllm.engine.block import Concat
    from riverllm.kernels.gguf_linear import GGMLLinear
    from riverllm.kernels.prompts import PromptSplit

    lm = smollm2_ggml
    dtype = fast_cpu_dtype()
    layer0, attn0 = lm.engine.backbone[0], lm.engine.layers[0].self_attn
    qkv = layer0.qkv
    assert layer0.q is None and layer0.gate is None and isinstance(lm.engine.head_linear, GGMLLinear)
    assert isinstance(qkv, PromptSplit) and isinstance(qkv.step, GGMLLinear) and len(qkv.step.matrix.parts) == 3
    assert isinstance(qkv.prompt, Concat)
    assert torch.equal(qkv.prompt.parts[0].weight, attn0.q_proj.weight.to(dtype))
    assert len(layer0.gate_up.step.matrix.parts) == 2 and len(layer0.down.step.matrix.parts) == 1
    for bits in (4, 3):
        twins = lm.engine.twins(lm.river(bits))
        assert all(t.q is None and isinstance(t.qkv, Concat) for t in twins)
        q = twins[0].qkv.parts[0]
        assert isinstance(q, PromptSplit) and q.step is lm.river(bits)[0].self_attn.q_proj
        assert torch.equal(twins[0].down.prompt.weight, twins[0].down.step.dequantized_weight().to(dtype))
        assert lm.engine.twins(lm.river(bits))[0] is twins[0]  # built once per river
    assert isinstance(lm.low_bit_head(4), QuantLinear)
    assert len(lm.generate("Hi", method="river3:0.9", max_new_tokens=4).token_ids) == 4
    lm.use_kernels("torch")
    try:
        assert isinstance(lm.engine.twins(lm.river(4))[0].q, QuantLinear)
    finally:
        lm.use_kernels("ggml")


def test_prompt_split_sends_prompts_to_the_copy_and_steps_to_the_kernel():
    from riverllm.kernels.prompts import PromptSplit, prompt_copy

    torch.manual_seed(0)
    twin = QuantLinear(torch.nn.Linear(128, 64), 4, 64)
    split = PromptSplit(twin, prompt_copy(twin))
    prompt, step = torch.randn(2, 5, 128), torch.randn(3, 1, 128)
    assert torch.equal(split(step), twin(step))
    expected = split.prompt(prompt.to(split.prompt.weight.dtype)).to(prompt.dtype)
    assert torch.equal(split(prompt), expected) and not torch.equal(split(prompt), twin(prompt))
    assert split.weight_bytes() == twin.weight_bytes()


@needs_ggml
def test_free_backbone_on_ggml_drops_the_layers_everywhere():
    import riverllm

    lm = riverllm.load("smollm2-135m", progress=False, kernels="ggml")
    lm.free_backbone(6)
    assert lm.engine.backbone[6] is None and lm._ggml.backbone[6] is None
    assert lm._torch_modules[0][6] is None
    lm.use_kernels("torch")
    assert lm.engine.backbone[5] is not None and lm.engine.backbone[6] is None
    result = lm.generate("Hi", method="river:0.9", max_new_tokens=4)
    assert max(result.exit_layers) <= 6


@needs_ggml
def test_batch_bench_runs_both_kernel_sets_and_checks_invariance():
    from riverllm.bench.batch import BatchBenchSettings, run_batch_bench

    settings = BatchBenchSettings("smollm2-135m", batch_sizes=(1, 2), methods=("river:0.9", "river:0.9+ggml"),
                                  num_prompts=2, new_tokens=3, check_tokens=6)
    report = run_batch_bench(settings, progress=False)
    assert {(r["method"], r["batch_size"]) for r in report["rows"]} == \
        {(m, b) for m in settings.methods for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in report["rows"])
    assert [(i["method"], i["identical"]) for i in report["invariance"]] == [("river:0.9", 2), ("river:0.9+ggml", 2)]


@needs_ggml
def test_eval_records_its_kernels_and_refuses_to_mix_them(smollm2_ggml, tmp_path):
    import json

    from riverllm.eval.runner import EvalConfig, run_eval

    lm = smollm2_ggml
    config = EvalConfig.parse("gsm8k", "river:0.9", tmp_path, 1, "4", metrics="none", progress=False)
    summary = run_eval(lm, config)
    assert json.loads((tmp_path / "run.json").read_text())["kernels"] == "ggml"
    assert summary  # one sample scored on ggml
    lm.use_kernels("torch")
    try:
        with pytest.raises(RiverError, match="kernels=ggml"):
            run_eval(lm, config)
    finally:
        lm.use_kernels("ggml")


@needs_ggml
def test_token_bytes_are_what_the_ggml_step_reads(smollm2_ggml, script):
    """riverllm.bench.token_bytes prices a token from the GGUF's tensor table; the ggml modules the
    decoding step multiplies with must read exactly those bytes (and the twins their int4 codes)."""
    from riverllm.bench.token_bytes import ggml_token_bytes

    lm = smollm2_ggml
    river = lm.river(4)
    costs = ggml_token_bytes(lm.gguf_path, lm.num_layers, river)
    for index, projections in enumerate(lm.engine.backbone):
        modules = [m for m in vars(projections).values() if m is not None]
        assert costs.backbone[index] == sum(m.weight_bytes() for m in modules)
    assert costs.head == lm.engine.head_linear.weight_bytes()
    twin = lm.engine.twins(river)[3]
    assert costs.twins[3] == sum(m.weight_bytes() for m in vars(twin).values() if m is not None)
    assert costs.at_depth(0) < costs.dense and costs.mixed(0) == costs.at_depth(0)
    assert ggml_token_bytes(lm.gguf_path, lm.num_layers, river, lm.low_bit_head(4)).head < costs.head
    # scripts/token_bytes.py prices a River setting at its fractional mean exit layer
    assert script("token_bytes").at_mean_depth(costs, 2.5) == (costs.at_depth(2) + costs.at_depth(3)) / 2
