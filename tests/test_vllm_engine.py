"""River inside vLLM (CPU build), against vLLM's dense model and riverllm's own engine, on the
real SmolLM2-135M. Needs vLLM: `bash scripts/test_vllm.sh` (its own environment); the main suite
skips this file.

Each vLLM engine runs in a subprocess (riverllm.vllm_plugin.offline): vLLM keeps process-wide
state, and its warnings must not meet this suite's warnings-as-errors filter. All comparisons
are token for token: greedy, float32, the same prompt token ids on both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "smollm2-135m"
PROMPTS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
           "Name three rivers.", "Explain in two sentences why the sky is blue."]
MAX_TOKENS = 24
TAU = 0.9


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from riverllm.vllm_plugin.serve import model_directory

    return model_directory(MODEL, progress=False)


@pytest.fixture(scope="module")
def own(model_dir):
    """riverllm's own engine on the same directory: prompt ids, and tokens + exit layers per method."""
    import riverllm

    lm = riverllm.load(str(model_dir), progress=False)
    results = {method: lm.generate_batch(PROMPTS, method=method, max_new_tokens=MAX_TOKENS)
               for method in ("dense", f"river:{TAU}")}
    return {"ids": [lm.encode(prompt) for prompt in PROMPTS], "tokenizer": lm.tokenizer,
            **{method: ([r.token_ids for r in rs], [r.exit_layers for r in rs]) for method, rs in results.items()}}


def offline(model_dir: Path, prompt_ids: list[list[int]], tmp_path: Path, tau: float | None) -> dict:
    from riverllm.vllm_plugin.offline import run_in_subprocess

    return run_in_subprocess(model_dir, prompt_ids, tau, MAX_TOKENS, tmp_path, timeout_s=900)


@pytest.fixture(scope="module")
def vllm_dense(model_dir, own, tmp_path_factory):
    return offline(model_dir, own["ids"], tmp_path_factory.mktemp("dense"), None)


def test_vllm_dense_equals_riverllm_dense(vllm_dense, own):
    # The baseline the River comparisons stand on: the two engines agree without River.
    assert vllm_dense["tokens"] == own["dense"][0]


def test_river_tau_above_one_gives_vllm_dense_tokens(model_dir, own, vllm_dense, tmp_path):
    river = offline(model_dir, own["ids"], tmp_path, 2.0)
    assert river["tokens"] == vllm_dense["tokens"]
    stats = river["stats"]
    assert stats["decode_mean_exit_layer"] == stats["num_layers"] == 30
    assert stats["decode_tokens"] == sum(len(tokens) - 1 for tokens in vllm_dense["tokens"])


def test_river_exits_and_matches_riverllm_engine(model_dir, own, tmp_path):
    river = offline(model_dir, own["ids"], tmp_path, TAU)
    tokens, exit_layers = own[f"river:{TAU}"]
    assert river["tokens"] == tokens
    assert tokens != own["dense"][0]  # the exits really changed something, so the equality says something
    stats = river["stats"]
    # riverllm records, per generated token, the backbone layers of the step that produced it: the
    # first from the prompt's prefill, the rest from decoding steps (what vLLM's counters see).
    decode = Counter(layer for layers in exit_layers for layer in layers[1:])
    assert {layer: n for layer, n in enumerate(stats["decode_exit_histogram"]) if n} == dict(decode)
    prefill = [layers[0] for layers in exit_layers]
    assert stats["prefill_mean_exit_layer"] == pytest.approx(sum(prefill) / len(prefill))
    assert stats["decode_mean_exit_layer"] < 5  # SPEC.md section 2: about 3 of 30 at tau 0.9


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`riverllm serve --engine vllm` with River at TAU (vLLM's OpenAI server in a subprocess)."""
    import httpx

    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "vllm-server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "riverllm.cli", "serve", "--engine", "vllm", "--model", MODEL,
                                "--method", f"river:{TAU}", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            assert process.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.time() < deadline, "the vLLM server did not come up in 10 minutes"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_openai_client_gets_riverllm_answers(server, own):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    model = client.models.list().data[0].id
    expected = [own["tokenizer"].decode(tokens, skip_special_tokens=True) for tokens in own[f"river:{TAU}"][0]]

    def chat(prompt: str) -> str:
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=MAX_TOKENS, temperature=0)
        return response.choices[0].message.content

    # All at once: vLLM batches them; per-sequence exits keep each answer what it is alone.
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(chat, PROMPTS)) == expected
    stream = client.completions.create(model=model, prompt=own["ids"][1], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected[1]
