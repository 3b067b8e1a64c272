#!/usr/bin/env bash
# Install what the tests need (torch first: its CPU wheel, unless a torch is already there, as on
# the GPU image), then run the whole test suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# The ggml extra compiles llama.cpp (about 4 minutes here); its multimodal library is not needed.
CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF} python -m pip install -q -e ".[test,ggml]"
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
