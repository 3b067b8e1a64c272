"""The ggml kernels (riverllm.kernels): GGUF blocks and Q4_1 twins multiplied by llama.cpp's code.

The repacking tests need only torch and the gguf package; the rest need llama-cpp-python (the
`ggml` extra, which .ci/run installs)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import nn

from riverllm.errors import RiverError
from riverllm.kernels import ggml
from riverllm.kernels.gguf_linear import q4_1_blocks, unpack_int4_cpu
from riverllm.river.quant import QuantLinear

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the ggml extra) is not installed")


def test_unpack_int4_cpu_recovers_the_codes():
    codes = torch.randint(0, 16, (192, 256), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(unpack_int4_cpu(packed, 192, 256).to(torch.int32), codes)


def test_unpack_int4_cpu_refuses_unknown_shapes():
    with pytest.raises(RiverError, match="multiple of 64"):
        unpack_int4_cpu(torch.zeros(48, 64, dtype=torch.uint8), 48, 128)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_q4_1_blocks_hold_the_twins_weights(group_size):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    twin = QuantLinear(linear, bits=4, group_size=group_size, optimize=False)
    blocks = q4_1_blocks(twin).numpy()
    restored = dequantize(blocks, GGMLQuantizationType.Q4_1).reshape(128, 256)
    # What the int4 kernel computes with: W = (q - 8) scale + zero, in float32.
    codes = unpack_int4_cpu(twin.packed, 128, 256).float()
    scale = twin.scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zero = twin.scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    expected = ((codes - 8) * scale + zero).numpy()
    # Q4_1 keeps d and m in float16: each weight moves by at most 15 d + |m| float16 half-ulps.
    bound = (15 * scale.abs() + (zero - 8 * scale).abs()).numpy() * 2.0 ** -11
    assert (np.abs(restored - expected) <= bound + 1e-8).all()


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
    matrix = ggml.QuantMatrix(rows, int(tensor.tensor_type), weight.shape[1])
    x = torch.randn(3, weight.shape[1])
    got, expected = matrix.matmul(x), x @ weight.t()
    assert got.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() > 0.999
    # One row alone gives the bits it gets among others (what lossless verification relies on).
    assert torch.equal(matrix.matmul(x[1:2]), got[1:2])


@needs_ggml
def test_quant_matrix_refuses_mismatched_blocks():
    with pytest.raises(RiverError, match="bytes"):
        ggml.QuantMatrix(np.zeros((4, 10), dtype=np.uint8), ggml.GGML_Q8_0, 64)


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
    from riverllm.bench.llamacpp import split_method

    assert split_method("dense") == ("dense", "torch", {})
    assert split_method("river:0.9+ggml+head4") == ("river:0.9", "ggml", {"head_bits": 4})
    with pytest.raises(RiverError, match=r"\+fast"):
        split_method("dense+fast")


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
def test_ggml_keeps_twins_it_cannot_repack_on_torch(smollm2_ggml):
    """A 3-bit river has no Q4_1 form: its twins stay PyTorch modules and River still runs."""
    from riverllm.kernels.gguf_linear import GGMLLinear

    lm = smollm2_ggml
    twins = lm.engine.twins(lm.river(3))
    assert not any(isinstance(t.q, GGMLLinear) for t in twins)
    assert isinstance(lm.engine.twins(lm.river(4))[0].q, GGMLLinear)
    assert len(lm.generate("Hi", method="river3:0.9", max_new_tokens=4).token_ids) == 4


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
