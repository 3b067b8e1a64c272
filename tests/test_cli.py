"""The `riverllm` command: real subprocesses, checking output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

CLI = [sys.executable, "-c", "from riverllm.cli import main; main()"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_hf) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and a 64-token context, saved as a HF directory."""
    _, tokenizer = smollm2_hf
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generate_json_on_the_default_model():
    proc = run("generate", "--prompt", "What is 2 + 3?", "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"text", "token_ids", "exit_layers", "tokens_per_s"} <= data.keys()
    assert len(data["token_ids"]) == len(data["exit_layers"]) >= 1
    assert all(2 <= layer <= 30 for layer in data["exit_layers"])


def test_generate_text_prints_answer_and_summary(tiny_dir):
    proc = run("generate", "--model", str(tiny_dir), "--prompt", "hello", "--method", "dense", "-n", "5", "--raw")
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr and "mean exit layer 6.0/6" in proc.stderr


def test_methods_agree_with_library(tiny_dir):
    import riverllm

    lm = riverllm.load(str(tiny_dir), device="cpu", progress=False)
    for method in ("dense", "w4", "river:0.5"):
        proc = run("generate", "--model", str(tiny_dir), "--prompt", "hello there", "--method", method, "-n", "6",
                   "--json", "--raw", "--dtype", "float32")  # the library's default; the CLI picks per CPU
        assert proc.returncode == 0, proc.stderr
        expected = lm.generate("hello there", method=method, max_new_tokens=6, raw=True)
        assert json.loads(proc.stdout)["token_ids"] == expected.token_ids


def test_summary_line_names_the_dtype_and_threads_it_ran_with(tiny_dir):
    from riverllm.cpu import fast_cpu_dtype

    proc = run("generate", "--model", str(tiny_dir), "--prompt", "hello", "-n", "3", "--raw", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"{str(fast_cpu_dtype()).removeprefix('torch.')}, 1 CPU thread" in proc.stderr
    proc = run("generate", "--model", str(tiny_dir), "--prompt", "hello", "-n", "3", "--raw", "--dtype", "float32",
               "--threads", "2")
    assert proc.returncode == 0 and "float32, 2 CPU threads" in proc.stderr, proc.stderr
    assert_one_line_error(run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--dtype", "fp8"), "--dtype")
    assert_one_line_error(run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--threads", "0"), "--threads")


def test_models_lists_the_packaged_models():
    proc = run("models", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)}
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"} <= names


def test_inspect_writes_a_heatmap(tiny_dir, tmp_path):
    plot = tmp_path / "sims.png"
    proc = run("inspect", "--model", str(tiny_dir), "--prompt", "one two three", "--raw", "--plot", str(plot), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["similarities"]) == len(report["tokens"]) and len(report["similarities"][0]) == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model"], ["unknown model", "smollm2-135m"]),
    (["--model", "/nonexistent/model.gguf"], ["no such file"]),
    (["--tau", "nan"], ["tau"]),
    (["--tau", "50"], ["tau"]),
    (["--max-new-tokens", "0"], ["max-new-tokens"]),
    (["--max-new-tokens", "999999"], ["max-new-tokens"]),
    (["--method", "fast"], ["unknown method"]),
    (["--method", "dense", "--tau", "0.5"], ["tau"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--bits", "5"], ["bits"]),
    (["--method", "river", "--draft-tokens", "3"], ["lossless method only"]),
    (["--method", "lossless", "--draft-tokens", "99"], ["draft tokens"]),
    (["--method", "river", "--draft-lookup", "5"], ["lossless method only"]),
    (["--method", "lossless", "--draft-lookup", "-1"], ["prompt-lookup drafts"]),
    (["--head-bits", "3"], ["low-bit LM head"]),
])
def test_bad_arguments_get_one_line_errors(tiny_dir, args, words):
    base = ["generate", "--prompt", "hi", "--raw"]
    if "--model" not in args:
        base += ["--model", str(tiny_dir)]
    assert_one_line_error(run(*base, *args), *words)


def test_empty_and_too_long_prompts(tiny_dir):
    assert_one_line_error(run("generate", "--model", str(tiny_dir), "--prompt", "   "), "empty")
    long_prompt = "word " * 200  # far beyond the tiny model's 64-token context
    assert_one_line_error(run("generate", "--model", str(tiny_dir), "--prompt", long_prompt, "--raw"), "context")


def test_corrupt_and_truncated_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    assert_one_line_error(run("generate", "--model", str(junk), "--prompt", "hi"), "gguf")
    from riverllm.loading import ensure_packaged

    real = ensure_packaged("smollm2-135m", progress=False)
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as source:
        truncated.write_bytes(source.read(2_000_000))
    assert_one_line_error(run("generate", "--model", str(truncated), "--prompt", "hi"), "gguf")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "gpt2", "llama")


def test_checksum_mismatch_leaves_nothing_behind(tmp_path):
    # A cache dir of our own, and a registry entry whose checksum cannot match.
    script = (
        "import riverllm.loading as L, dataclasses, sys;"
        "m = L.PACKAGED_MODELS['smollm2-135m'];"
        "L.PACKAGED_MODELS['smollm2-135m'] = dataclasses.replace(m, sha256='0' * 64);"
        "from riverllm.cli import main; sys.argv = ['riverllm', 'generate', '--prompt', 'hi']; main()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RIVERLLM_CACHE": str(tmp_path)})
    assert_one_line_error(proc, "checksum")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_every_option_has_help_and_booleans_are_flags():
    import typer.main

    from riverllm.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            assert param.help, f"riverllm {name} {param.opts}: no help text"
            if isinstance(param.default, bool):
                assert getattr(param, "is_flag", False), f"riverllm {name} {param.opts}: a boolean that takes a value"


def test_stop_escapes_are_read_as_characters():
    from riverllm.cli import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb" and unescape(r"x\\n") == "x\\n"
    assert unescape(r"\q") == r"\q" and unescape("é\n") == "é\n"


@pytest.mark.parametrize("args, words", [
    (["inspect", "--prompt", "hi", "--plot", "/proc/no/such/dir/x.png"], ["--plot", "cannot write"]),
    (["generate", "--prompt", "hi", "--device", "meta"], ["meta", "cpu"]),
    (["eval", "--out", "/tmp/riverllm-never-written", "--kernels", "mkl"], ["--kernels", "ggml"]),
    (["eval", "--out", "/tmp/riverllm-never-written", "--dtype", "fp8"], ["--dtype", "bfloat16"]),
    (["serve", "--kernels", "mkl"], ["--kernels", "ggml"]),
    (["serve", "--engine", "vllm", "--kernels", "ggml"], ["--kernels", "riverllm's own server"]),
])
def test_bad_paths_and_devices_are_one_line_errors(tiny_dir, args, words):
    assert_one_line_error(run(*args, "--model", str(tiny_dir)), *words)


def test_summary_line_says_which_tau_ran_and_where_it_came_from(tiny_dir):
    given = run("generate", "--model", str(tiny_dir), "--prompt", "Hello", "-n", "3", "--tau", "0.5")
    assert given.returncode == 0, given.stderr
    assert "tau 0.5 from the request" in given.stderr
    default = run("generate", "--model", str(tiny_dir), "--prompt", "Hello", "-n", "3")
    assert "from the default" in default.stderr or "from the profile" in default.stderr


def test_chat_trims_the_oldest_turns_to_fit_the_context(tiny_dir):
    """The tiny model has a 64-token context: a few turns overflow it. The chat goes on, says once
    that it drops old turns, and refuses (without ending) a single message too long to fit."""
    turns = "\n".join(["tell me about rivers and seas"] * 5 + ["word " * 200, "/exit"]) + "\n"
    proc = subprocess.run([*CLI, "chat", "--model", str(tiny_dir), "-n", "8"], input=turns, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("dropping its oldest turns") == 1
    assert "does not fit the context window" in proc.stderr
    assert proc.stdout.count("river> ") == 5


def test_cache_files_are_readable_like_any_other_file(tmp_path):
    """The one atomic writer leaves files with the umask's ordinary mode (mkstemp alone makes 0600)."""
    from riverllm.files import write_text_atomic

    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "sub" / "profile.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and path.read_text() == "{}"
    assert list(path.parent.iterdir()) == [path]  # no temp file left


def test_eval_runs_in_the_dtype_asked_for_and_keeps_it(tiny_dir, tmp_path):
    """`eval --dtype bfloat16` (on a CPU with native bfloat16 several times faster in batches) loads
    the backbone in bfloat16, records it in run.json, and refuses to resume that run in float32."""
    common = ("eval", "--model", str(tiny_dir), "--tasks", "ppl", "--methods", "dense,river:0.9", "--metrics",
              "agree", "--ppl-tokens", "32", "--ppl-window", "16", "--out", str(tmp_path / "run"), "--quiet")
    proc = run(*common, "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "bfloat16"
    assert_one_line_error(run(*common, "--dtype", "float32"), "dtype=bfloat16")
