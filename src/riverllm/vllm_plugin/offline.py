"""Run a model under vLLM in this process, dense or with River, on given prompt token ids.

    python -m riverllm.vllm_plugin.offline DIR --prompts ids.json --tau 0.9 --max-tokens 24 --out result.json

writes one JSON object (vLLM logs to stdout, so it goes to a file): the generated token ids per prompt, River's exit statistics (null for
dense), load and generation seconds. The tests and the benchmark run it as a subprocess, one
engine per process: vLLM keeps process-wide distributed state, so a second engine in the same
process is not something to rely on.

Prompts are token ids (a JSON list of lists), not text, so that vLLM and riverllm's own engine
are compared on exactly the same input whatever each side's chat-template handling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# What vLLM's CPU build needs to run in-process (SPEC.md section 2, docs/vllm.md).
CPU_ENVIRONMENT = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def dense_architecture(model_dir: Path) -> str:
    from riverllm.errors import RiverError
    from riverllm.vllm_plugin import DENSE_TO_RIVER

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RiverError(f"{model_dir} is not a HuggingFace model directory ({error}): convert a GGUF first "
                         f"with `python -m riverllm.vllm_plugin.convert`") from None
    architecture = (config.get("architectures") or [""])[0]
    if architecture not in DENSE_TO_RIVER:
        raise RiverError(f"{model_dir}: architecture {architecture or '(none)'} has no River variant; "
                         f"supported: {', '.join(DENSE_TO_RIVER)}")
    return architecture


def run(model_dir: Path, prompts: list[list[int]], tau: float | None, max_tokens: int, bits: int = 4,
        max_model_len: int = 2048) -> dict[str, Any]:
    """Greedy generation of `max_tokens` per prompt (EOS ends a prompt early), all prompts in one
    vLLM batch; tau None runs vLLM's own dense model."""
    for name, value in CPU_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from riverllm.vllm_plugin.serve import hf_overrides

    # JSON has no infinity: any tau above 1 means "never exit" to River (settings.RiverSettings.policy).
    river_tau = None if tau is None else min(tau, 2.0)
    overrides = hf_overrides(dense_architecture(model_dir), "dense" if tau is None else "river", river_tau, bits, 64)
    started = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, hf_overrides=overrides,
              max_model_len=max_model_len, seed=0, enable_prefix_caching=False)
    load_s = time.perf_counter() - started
    if overrides:
        llm.apply_model(lambda model: model.river_stats.reset())  # the warm-up run is not a request
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    generate_s = time.perf_counter() - started
    stats = llm.apply_model(lambda model: model.river_stats.summary())[0] if overrides else None
    return {"tokens": [list(output.outputs[0].token_ids) for output in outputs], "stats": stats,
            "load_s": load_s, "generate_s": generate_s}


def run_in_subprocess(model_dir: Path, prompts: list[list[int]], tau: float | None, max_tokens: int,
                      workdir: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """`run` in a fresh Python (one vLLM engine per process); RuntimeError with its stderr's tail."""
    import subprocess

    prompts_file, out = workdir / "prompts.json", workdir / f"result-{'dense' if tau is None else tau}.json"
    prompts_file.write_text(json.dumps(prompts), encoding="utf-8")
    command = [sys.executable, "-m", "riverllm.vllm_plugin.offline", str(model_dir), "--prompts", str(prompts_file),
               "--max-tokens", str(max_tokens), "--out", str(out)] + ([] if tau is None else ["--tau", str(tau)])
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if finished.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({finished.returncode}): {finished.stderr[-3000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    from riverllm.errors import RiverError
    from riverllm.files import write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a HuggingFace directory (riverllm.vllm_plugin.convert writes one)")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--tau", type=float, default=None, help="River's tau (above 1: never exit); omit for dense vLLM")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    try:
        prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"error: cannot read {args.prompts}: {error}", file=sys.stderr)
        return 2
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
        print(f"error: {args.prompts}: expected a JSON list of non-empty token-id lists", file=sys.stderr)
        return 2
    try:
        result = run(args.model_dir, prompts, args.tau, args.max_tokens, args.bits)
    except RiverError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
