#!/usr/bin/env bash
# Install what the tests need (torch first: its CPU wheel, unless a torch is already there, as on
# the GPU image), then run the whole test suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# The ggml extra compiles llama.cpp for this CPU (about 4 minutes here; its multimodal library is
# not needed). AMX stays off on x86: llama.cpp's AMX kernels crash on this project's virtual
# machines (docs/kernels.md).
if [ -z "${CMAKE_ARGS:-}" ]; then
  CMAKE_ARGS="-DLLAVA_BUILD=OFF"
  if [ "$(uname -m)" = x86_64 ]; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_C_FLAGS=${NO_AMX// /\\ } -DCMAKE_CXX_FLAGS=${NO_AMX// /\\ }"
  fi
fi
CMAKE_ARGS=$CMAKE_ARGS python -m pip install -q -e ".[test,ggml]"
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
