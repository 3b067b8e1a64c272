#!/usr/bin/env bash
# The quality study (issue 11), resumable: rerun the same command after an interruption and
# `riverllm eval` skips every sample already in the directory's JSONL files.
#
#   bash scripts/study.sh qwen2.5-coder-0.5b docs/results/study_qwen0.5b
#
# One intra-op thread (OMP_NUM_THREADS=1): rows of a batch then get exactly their batch-1 output
# (docs/engine.md), and the run leaves the other core to whatever else the machine does.
# Methods, in the order they run (cheapest evidence first): the references, River at taus whose
# mean exit layers span ~3 layers to half the depth (chosen from a similarity pass on GSM8K
# answers: docs/study.md), the static-depth controls river@K at those depths and the static mixes
# w4-lastK (the last K layers at full precision) at the same costs, River at 3 bits,
# then the prior strategies at River's settings.
# DTYPE=bfloat16 runs the backbone in bfloat16 (on a CPU with native bfloat16, 3-4x the batched
# throughput of float32 here: docs/kernels.md); a directory holds one dtype (run.json).
set -euo pipefail
MODEL=${1:-qwen2.5-coder-0.5b}
OUT=${2:-docs/results/study_qwen0.5b}
METHODS=${METHODS:-dense,w4,river:0.85,river:0.9,river:0.92,river:0.94,river:0.95,river@3,river@4,river@6,river@8,river@11,w4-last4,w4-last8,w3,river3:0.9,river3:0.94,river3:0.96,river3@8,w3-last8}
DTYPE=${DTYPE:-float32}
export OMP_NUM_THREADS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
for TASK in ${TASKS:-gsm8k humaneval}; do
  riverllm eval --model "$MODEL" --tasks "$TASK" --methods "$METHODS" --batch-size 8 --metrics none \
    --dtype "$DTYPE" --out "$OUT" --quiet
done
if [ "${PPL:-1}" = 1 ]; then
  riverllm eval --model "$MODEL" --tasks ppl --methods "$METHODS" --batch-size 8 --metrics agree,kl \
    --ppl-tokens 4096 --ppl-window 256 --dtype "$DTYPE" --out "$OUT" --quiet
fi
python scripts/study_report.py "$OUT"
