"""The `riverllm` command. Each subcommand parses its flags, calls the library, and prints.

User mistakes arrive here as `RiverError`s and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from riverllm.errors import RiverError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="River-LLM: training-free token-level early exit for decoder-only LLMs.")

MODEL_HELP = "packaged name (see `riverllm models`), a HuggingFace model directory, or a .gguf file"
ModelOption = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP)
DeviceOption = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def unescape(text: str) -> str:
    """A shell passes `--stop "\\n\\n"` as backslash-n: read \\n, \\t and \\\\ as the characters."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m.group(1), m.group(0)), text)


DtypeOption = typer.Option("auto", "--dtype", help="backbone dtype: auto (CPU: bfloat16 where the CPU has native "
                           "bfloat16, else float32; CUDA: bfloat16) | float32 | bfloat16 | float16")
KernelsOption = typer.Option("torch", "--kernels", help="torch (dequantized weights, PyTorch's kernels) | ggml "
                             "(CPU, GGUF models: the file's quantized blocks on llama.cpp's kernels; needs "
                             "pip install 'riverllm[ggml]'; docs/kernels.md)")
ThreadsOption = typer.Option(None, "--threads", help="CPU threads (default: OMP_NUM_THREADS, else the idle cores "
                             "now: a busy machine stalls every extra thread)")


def load_lm(model: str, device: Optional[str], bits: int = 4, group_size: int = 64, quiet: bool = False,
            dtype: Optional[str] = None, threads: Optional[int] = None, fast_cpu_defaults: bool = False,
            kernels: str = "torch", fast_cpu_dtype_default: bool = False):
    """Load a RiverLM. With `fast_cpu_defaults` (generate, chat), a CPU run gets the dtype and thread
    count that decode fastest here (cpu.py); with `fast_cpu_dtype_default` (serve: its worker picks
    its own threads) only the dtype; measuring commands keep float32 and torch's threads."""
    import riverllm
    from riverllm.cpu import fast_cpu_dtype, parse_dtype, pick_cpu_threads

    torch_dtype = parse_dtype(dtype)
    on_cpu = (device or "").startswith("cpu") or (device is None and not _cuda_available())
    if (fast_cpu_defaults or fast_cpu_dtype_default) and on_cpu:
        torch_dtype = torch_dtype or fast_cpu_dtype()
    if (fast_cpu_defaults and on_cpu) or threads is not None:
        pick_cpu_threads(threads)
    return riverllm.load(model, device=device, dtype=torch_dtype, bits=bits, group_size=group_size,
                         progress=not quiet, kernels=kernels)


def check_kernels(kernels: str) -> None:
    """Fail on a typo before the slow load."""
    from riverllm.api import KERNELS

    if kernels not in KERNELS:
        raise RiverError(f"--kernels takes {' or '.join(KERNELS)}, got '{kernels}'")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt text"),
    model: str = ModelOption,
    method: str = typer.Option("river", help="dense | w4 | river | lossless (also w3, river3, river:0.9, lossless:0.9 ...)"),
    tau: Optional[float] = typer.Option(None, help="exit threshold on cos(h_{l-1}, h_l); default per model"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling: keep the smallest set of tokens with this "
                                "probability mass"),
    top_k: int = typer.Option(0, "--top-k", help="0 is off"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable); \\n, \\t and \\\\ are "
                                   "read as newline, tab and backslash"),
    raw: bool = typer.Option(False, "--raw", help="feed the prompt as is, no chat template"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    bits: int = typer.Option(4, help="river bit width: 2, 3, 4 or 8"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size"),
    min_exit_layer: int = typer.Option(1, "--min-exit-layer", help="exits allowed only after deeper layers"),
    max_backbone_layers: Optional[int] = typer.Option(None, "--max-backbone-layers",
                                                      help="force the exit here at the latest"),
    head_bits: Optional[int] = typer.Option(None, "--head-bits", help="read the LM head as a low-bit (4) copy: "
                                            "faster, lossy; off by default (lossless drafts use it unless set)"),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help="lossless: River drafts per backbone "
                                               "pass at most (default: the model's speed profile, else 4; 2 on a "
                                               "CPU in float32)"),
    draft_confidence: Optional[float] = typer.Option(None, "--draft-confidence", help="lossless: stop drafting "
                                                     "when the draft's top-1 probability is below this (default 0)"),
    draft_lookup: Optional[int] = typer.Option(None, "--draft-lookup", help="lossless: also draft up to this many "
                                               "tokens copied from the prompt or output where its last tokens "
                                               "occurred before (prompt lookup; default 7 on CPU, 10 on GPU; 0: off)"),
    device: Optional[str] = DeviceOption,
    dtype: str = DtypeOption,
    threads: Optional[int] = ThreadsOption,
    kernels: str = KernelsOption,
) -> None:
    """Generate text with River-LLM (or the dense / w4 baselines, or exactly dense's output with lossless)."""
    from riverllm.api import check_generation_options
    from riverllm.river import QuantConfig

    options = dict(method=method, tau=tau, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=seed, stop=[unescape(s) for s in stop], raw=raw, bits=bits,
                   min_exit_layer=min_exit_layer, max_backbone_layers=max_backbone_layers, head_bits=head_bits,
                   draft_tokens=draft_tokens, draft_confidence=draft_confidence, draft_lookup=draft_lookup)
    check_generation_options(**options)  # fail on a typo before the slow load
    QuantConfig(bits, group_size)
    if not prompt.strip():
        raise RiverError("the prompt is empty: pass some text with --prompt")
    check_kernels(kernels)
    lm = load_lm(model, device, bits, group_size, quiet=as_json, dtype=dtype, threads=threads, fast_cpu_defaults=True,
                 kernels=kernels)
    if as_json:
        result = lm.generate(prompt, **options)
        typer.echo(json.dumps({"model": model, **result.to_dict()}))
        return
    result = None
    for event in lm.stream(prompt, **options):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        result = event.result or result
    sys.stdout.write("\n")
    typer.echo(result.summary(), err=True)


@app.command()
def chat(
    model: str = ModelOption,
    method: str = typer.Option("river", help="dense | w4 | river | lossless (also w3, river3, river:0.9, lossless:0.9 ...)"),
    tau: Optional[float] = typer.Option(None, help="exit threshold on cos(h_{l-1}, h_l); default per model"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="tokens per reply at most"),
    temperature: float = typer.Option(0.0, help="0 is greedy"),
    device: Optional[str] = DeviceOption,
    dtype: str = DtypeOption,
    threads: Optional[int] = ThreadsOption,
    kernels: str = KernelsOption,
) -> None:
    """Chat interactively (streaming). Type /exit or Ctrl-D to leave, /reset to forget."""
    from riverllm.api import check_generation_options

    check_generation_options(method, tau, max_new_tokens, temperature)
    check_kernels(kernels)
    lm = load_lm(model, device, dtype=dtype, threads=threads, fast_cpu_defaults=True, kernels=kernels)
    messages: list[dict] = []
    trimmed_before = False
    typer.echo(f"chatting with {model} ({method}); /exit to leave, /reset to start over", err=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            typer.echo("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        # Keep the conversation inside the context window: drop the oldest turns, and say so once.
        room = lm.context_length - min(max_new_tokens, lm.context_length // 2)
        while len(messages) > 1 and len(lm.encode(messages)) > room:
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            if not trimmed_before:
                typer.echo("[the conversation is longer than the context window: dropping its oldest turns]", err=True)
                trimmed_before = True
        if len(lm.encode(messages)) > room:
            typer.echo(f"[that message alone does not fit the context window of {lm.context_length} tokens: "
                       "send a shorter one]", err=True)
            messages.pop()
            continue
        sys.stdout.write("river> ")
        result = None
        for event in lm.stream(messages, method=method, tau=tau, max_new_tokens=max_new_tokens,
                               temperature=temperature):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            result = event.result or result
        sys.stdout.write("\n")
        typer.echo(f"[{result.summary()}]", err=True)
        messages.append({"role": "assistant", "content": result.text})


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the packaged models, their size, whether they are installed, and what is cached for them."""
    from riverllm.loading import PACKAGED_MODELS, cache_dir, human_size, list_models
    from riverllm.model_cache import list_entries

    rows = list_models()
    cached = list_entries()
    for row in rows:
        row["cached"] = [entry for entry in cached if entry["label"] == row["name"]]
    # Backbones converted from .gguf files that are not packaged models: one row each.
    rows += [{"name": entry["label"], "title": entry["source"], "size_bytes": None, "installed": None,
              "path": entry["source"], "cached": [entry]}
             for entry in cached if entry["label"] not in PACKAGED_MODELS]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    def cache_cell(entries: list[dict]) -> str:
        return ", ".join(f"{entry['dtype']} {human_size(entry['bytes'])}"
                         + (f" + {len(entry['rivers'])} river(s) {human_size(entry['river_bytes'])}" if entry["rivers"] else "")
                         for entry in entries) or "-"

    table = Table("name", "model", "size", "installed", "cached (backbone + rivers)")
    for row in rows:
        packaged = row["size_bytes"] is not None
        table.add_row(row["name"], row["title"], human_size(row["size_bytes"]) if packaged else "",
                      ("yes" if row["installed"] else "no") if packaged else "", cache_cell(row["cached"]))
    console = Console()
    console.print(table)
    total = sum(entry["bytes"] + entry["river_bytes"] for entry in cached)
    console.print(f"cache: {cache_dir()} ({human_size(total)} of converted backbones and their rivers; "
                  "`riverllm cache clear [MODEL]` removes them)")


cache_app = typer.Typer(no_args_is_help=True, help="The riverllm cache: converted backbones and built rivers.")
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear(model: Optional[str] = typer.Argument(None, help="packaged name or .gguf path (default: all)")) -> None:
    """Remove cached backbones and rivers (all, or one model's); downloaded models stay installed."""
    from riverllm.loading import PACKAGED_MODELS, cache_dir
    from riverllm.model_cache import clear, list_entries

    if model is not None and model not in PACKAGED_MODELS and not Path(model).expanduser().exists() \
            and model not in {entry["label"] for entry in list_entries()}:
        fail(f"nothing is cached for '{model}': pass a packaged name ({', '.join(PACKAGED_MODELS)}), "
             "a .gguf path, or nothing to clear the whole cache")
    removed = clear(model)
    freed = sum(1 for _ in removed)
    what = f"for {model}" if model else f"in {cache_dir()}"
    typer.echo(f"removed {freed} cached item(s) {what}" if freed else f"nothing was cached {what}")


@app.command()
def inspect(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the text whose similarities to show"),
    model: str = ModelOption,
    raw: bool = typer.Option(False, "--raw", help="feed the prompt as is, no chat template"),
    tau: Optional[float] = typer.Option(None, help="highlight similarities above this"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a heat-map PNG here"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    device: Optional[str] = DeviceOption,
) -> None:
    """Show the state transition similarity s_l = cos(h_{l-1}, h_l) of each prompt token at each layer."""
    from riverllm.inspect import similarity_table, write_heatmap

    if not prompt.strip():
        fail("the prompt is empty: pass some text with --prompt")
    if plot is not None:
        folder = plot.expanduser().resolve().parent
        if plot.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            fail(f"--plot {plot}: cannot write a file there (is the folder missing or read-only?)")
    lm = load_lm(model, device, quiet=as_json)
    report = similarity_table(lm, prompt, raw=raw, tau=tau)
    if plot is not None:
        write_heatmap(report, plot)
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    threshold = report["tau"]
    table = Table("token", *[str(layer) for layer in range(1, report["num_layers"] + 1)], "exit",
                  title=f"s_l per token and layer (bold: > tau = {threshold:g})")
    for token, row, exit_layer in zip(report["tokens"], report["similarities"], report["exit_layers"]):
        cells = [f"[bold]{s:.2f}[/bold]" if s > threshold else f"{s:.2f}" for s in row]
        table.add_row(repr(token), *cells, str(exit_layer))
    Console().print(table)
    if plot is not None:
        typer.echo(f"heat-map written to {plot}", err=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    context: typer.Context,
    model: str = ModelOption,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface; set --api-key)"),
    port: int = typer.Option(8000, help="TCP port"),
    method: str = typer.Option("river", help="default method for requests that name none (dense | w4 | river ...)"),
    tau: Optional[float] = typer.Option(None, help="default exit threshold for river (default: per model)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RIVERLLM_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/*"),
    max_queue: int = typer.Option(256, "--max-queue", help="requests allowed to wait; more get HTTP 429"),
    max_batch_size: int = typer.Option(16, "--max-batch-size",
                                       help="requests decoded together (continuous batching); 1: one at a time"),
    kv_cache_tokens: Optional[int] = typer.Option(None, "--kv-cache-tokens",
                                                  help="KV-cache pool in tokens (default: max(context, "
                                                       "1024 x max-batch-size)); a request reserves prompt + max_tokens"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads of the model worker (default: 1 on "
                                          "CPU, which keeps batched answers equal to answers alone)"),
    bits: int = typer.Option(4, help="river bit width of the default method"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="larger request bodies get HTTP 413"),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens",
                                                    help="longer prompts get HTTP 400 (default: the context length)"),
    max_connections: int = typer.Option(512, "--max-connections", help="open connections and requests at once; "
                                        "beyond it HTTP 503"),
    keep_alive_s: float = typer.Option(5.0, "--keep-alive", help="seconds an idle keep-alive connection stays open"),
    device: Optional[str] = DeviceOption,
    dtype: str = DtypeOption,
    kernels: str = KernelsOption,
    engine: str = typer.Option("riverllm", "--engine", help="riverllm (this package's server) or vllm (vLLM's "
                               "OpenAI server with the River model; arguments after -- go to vLLM; docs/vllm.md)"),
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, streaming)."""
    if engine == "vllm":
        serve_vllm(context, model, host, port, method, tau, api_key, threads, bits, group_size, device)
        return
    check_kernels(kernels)
    if engine != "riverllm":
        fail(f"--engine must be riverllm or vllm, got '{engine}'")
    if context.args:
        fail(f"unexpected arguments {' '.join(context.args)}: only --engine vllm passes arguments on (after --)")
    from riverllm.server import ServerSettings
    from riverllm.server import serve as run_server

    settings = ServerSettings(host=host, port=port, method=method, tau=tau, api_key=api_key, max_queue=max_queue,
                              max_batch_size=max_batch_size, kv_cache_tokens=kv_cache_tokens, threads=threads,
                              max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                              max_connections=max_connections, keep_alive_s=keep_alive_s)
    settings.check()  # fail on a bad flag or a busy port before loading the model
    run_server(load_lm(model, device, bits, group_size, dtype=dtype, kernels=kernels, fast_cpu_dtype_default=True),
               settings)


def serve_vllm(context: typer.Context, model: str, host: str, port: int, method: str, tau: Optional[float],
               api_key: Optional[str], threads: Optional[int], bits: int, group_size: int,
               device: Optional[str]) -> None:
    """`serve --engine vllm`: flags that only riverllm's own server has are refused, not ignored."""
    from riverllm.vllm_plugin.serve import exec_server

    own_flags = {"max_queue": "--max-queue", "max_batch_size": "--max-batch-size (vLLM: -- --max-num-seqs N)",
                 "kv_cache_tokens": "--kv-cache-tokens (vLLM: VLLM_CPU_KVCACHE_SPACE=GiB)",
                 "max_body_bytes": "--max-body-bytes", "max_prompt_tokens": "--max-prompt-tokens (vLLM: -- "
                 "--max-model-len N)", "max_connections": "--max-connections", "keep_alive_s": "--keep-alive",
                 "device": "--device", "kernels": "--kernels"}
    source = click_source(context)
    given = [flag for name, flag in own_flags.items() if source(name)]
    if given:
        fail(f"{', '.join(given)}: riverllm's own server only; with --engine vllm leave it out")
    exec_server(model, host, port, method, tau, bits, group_size, api_key, threads, list(context.args))


def click_source(context: typer.Context):
    """name -> True when the user gave that option on the command line (not its default). By the
    enum's name: typer may bring its own copy of click's ParameterSource."""
    return lambda name: getattr(context.get_parameter_source(name), "name", "") == "COMMANDLINE"


@app.command("eval")
def eval_command(
    model: str = ModelOption,
    tasks: str = typer.Option("humaneval,gsm8k,asdiv,ppl", help="comma-separated: humaneval, gsm8k, asdiv, ppl"),
    methods: str = typer.Option("dense,w4,river:0.8,river:0.9,river:0.95",
                                help="comma-separated: dense, w4, river:TAU, river3:TAU, river@K (fixed exit), "
                                     "w4-lastK (last K layers at full precision), recompute:TAU, propagate:TAU, "
                                     "mask:TAU, monotonic:START-END"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (resumed if it holds a run)"),
    limit: Optional[int] = typer.Option(None, help="samples per task (a fixed subset); ppl: windows"),
    max_new_tokens: Optional[str] = typer.Option(
        None, "--max-new-tokens", help="N for every task, or TASK=N,... (default humaneval 384, gsm8k/asdiv 320)"),
    ppl_tokens: int = typer.Option(4096, "--ppl-tokens", help="tokens scored by ppl in all"),
    ppl_window: int = typer.Option(256, "--ppl-window", help="tokens scored per ppl window"),
    seed: int = typer.Option(0, help="seed of asdiv's subset under --limit"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples decoded together (per-row exits: each sample's "
                                   "result is the one it gets alone; prior strategies always run alone)"),
    metrics: Optional[str] = typer.Option(None, help="extra columns, e.g. match,agree,kl (default: all; none: none)"),
    bits: int = typer.Option(4, help="river bit width for methods that name none"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    unsafe_exec: bool = typer.Option(False, "--unsafe-exec", help="run HumanEval's model-written code even where "
                                     "the OS sandbox is unavailable (docs/security.md): only on a machine you "
                                     "can throw away"),
    device: Optional[str] = DeviceOption,
    kernels: str = KernelsOption,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="backbone dtype: float32 (CPU default) | bfloat16 "
                                        "(CUDA default; on a CPU with native bfloat16 several times faster in "
                                        "batches) | float16"),
) -> None:
    """Measure accuracy and speed of every method on real tasks; writes report.md, summary.json and plots."""
    from riverllm.cpu import parse_dtype
    from riverllm.eval.report import markdown_table
    from riverllm.eval.runner import EvalConfig, run_eval

    check_kernels(kernels)
    parse_dtype(dtype)  # a bad --dtype fails before anything is written
    config = EvalConfig.parse(tasks, methods, out, limit, max_new_tokens, metrics, ppl_tokens=ppl_tokens,
                              ppl_window=ppl_window, seed=seed, progress=not quiet,
                              unsafe_exec=unsafe_exec, batch_size=batch_size)
    summary = run_eval(load_lm(model, device, bits, group_size, quiet=quiet, kernels=kernels, dtype=dtype), config)
    typer.echo(markdown_table(summary))
    typer.echo(f"report written to {out / 'report.md'}", err=True)


def write_bench_outputs(out: Path, results: dict, markdown: str, *more: Path) -> None:
    """bench.json and bench.md into `out` (atomically), the table on stdout, the paths on stderr."""
    from riverllm.files import write_text_atomic

    write_text_atomic(out / "bench.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "bench.md", markdown)
    typer.echo(markdown)
    typer.echo("written: " + ", ".join(str(p) for p in (out / "bench.json", out / "bench.md", *more)), err=True)


@app.command()
def bench(
    shapes: Optional[str] = typer.Option(None, "--shapes", help="comma-separated shapes (random weights): "
                                         "llama-3.2-1b, llama-3.1-8b, qwen2.5-1.5b, smollm2-135m, tiny; "
                                         "default: the first three on CUDA, tiny on CPU"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="real weights instead: " + MODEL_HELP),
    device: Optional[str] = DeviceOption,
    out: Path = typer.Option(Path("runs/bench"), "--out", help="folder for bench.json, bench.md, bench.png"),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="prompt length (256 on CUDA, 32 on CPU)"),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="tokens to decode (256 on CUDA, 16 on CPU)"),
    prefill_tokens: Optional[int] = typer.Option(None, "--prefill-tokens", help="prompt for the prefill time "
                                                 "(2048 on CUDA, 128 on CPU)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="timed repeats, median taken"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="exit-depth profile: a `riverllm generate "
                                           "--json` output (default: the shipped SmolLM2-135M one)"),
    tau: float = typer.Option(0.9, help="with --model: the river's exit threshold"),
    prompts: str = typer.Option("random", "--prompts", help="with --model: random | humaneval"),
    num_prompts: int = typer.Option(5, "--num-prompts", help="with --model: how many prompts"),
    max_backbone_layers: int = typer.Option(8, "--max-backbone-layers", help="the memory-saving row: backbone "
                                            "layers kept in memory"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size of the river"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 (CUDA default) | float16 | float32 (CPU default)"),
    graphs: Optional[bool] = typer.Option(None, "--graphs/--no-graphs", help="CUDA graphs for our engine "
                                          "(default: on with CUDA)"),
    hf_compile: Optional[bool] = typer.Option(None, "--hf-compile/--no-hf-compile", help="time transformers "
                                              "with static cache + torch.compile (default: on with CUDA)"),
    copy_mib: Optional[int] = typer.Option(None, "--copy-mib", help="size of the bandwidth-measuring copy"),
    seed: int = typer.Option(0, help="seed for the random weights and prompts"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="with --model: batched throughput at these "
                                              "batch sizes (e.g. 1,4,8,16) and a batch-invariance check, instead "
                                              "of the batch-1 comparison"),
    methods: Optional[str] = typer.Option(None, "--methods", help="with --batch-sizes: methods (default dense,w4,"
                                          "river:0.9,river:0.9@batch-min; @batch-min: the paper's batch exit rule; "
                                          "+ggml: on the ggml kernels, e.g. river:0.9+ggml); "
                                          "with --exact: methods (default dense,river:0.9,lossless:0.9,"
                                          "lossless:0.9+lookup,hf,hf-lookup; lossless:TAU is River's drafts alone, "
                                          "+lookup[N] adds prompt-lookup drafts; also hf-assisted:MODEL)"),
    exact: bool = typer.Option(False, "--exact", help="with --model: exact decoding side by side (dense, lossless, "
                               "transformers' generate, prompt lookup, assisted generation) on HumanEval and GSM8K "
                               "prompts, with tokens compared to dense; resumes in --out"),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help="with --exact: lossless drafts per "
                                               "backbone pass at most"),
    llama_cpp: bool = typer.Option(False, "--llama-cpp", help="with --model (a GGUF): against llama.cpp on the same "
                                   "file, riverllm on torch and ggml kernels (METHOD+ggml), at 1 and 2 threads "
                                   "(or --threads); resumes in --out; needs the ggml extra"),
    check_tokens: int = typer.Option(128, "--check-tokens", help="with --batch-sizes: tokens of the invariance "
                                     "check (0: skip it)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)"),
) -> None:
    """Time dense, w4 and River-LLM against transformers, side by side: bench.json, bench.md, bench.png."""
    from riverllm.bench import BenchSettings, run_bench, write_outputs

    command = " ".join(["riverllm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "riverllm" else ""
    if llama_cpp:
        from riverllm.bench.llamacpp import LlamaCppBenchSettings, llamacpp_markdown, run_llamacpp_bench

        if not model:
            fail("--llama-cpp needs --model (a GGUF model: llama.cpp runs the same file)")
        defaults = LlamaCppBenchSettings(model=model)
        llama_settings = LlamaCppBenchSettings(
            model=model, methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else defaults.methods,
            threads=(threads,) if threads else defaults.threads,
            tasks=defaults.tasks if prompts == "random" else tuple(t.strip() for t in prompts.split(",")),
            num_prompts=num_prompts, new_tokens=new_tokens or defaults.new_tokens)
        llama_settings.check()
        results = run_llamacpp_bench(llama_settings, out)
        write_bench_outputs(out, results, llamacpp_markdown(results, command), out / "samples.jsonl")
        return
    if exact:
        from riverllm.bench.exact import ExactBenchSettings, exact_markdown, run_exact_bench

        if not model:
            fail("--exact needs --model (a real model: acceptance depends on real weights)")
        exact_settings = ExactBenchSettings(
            model=model, methods=tuple(m.strip() for m in (methods or ",".join(ExactBenchSettings.methods))
                                       .split(",") if m.strip()),
            tasks=("humaneval", "gsm8k") if prompts == "random" else tuple(t.strip() for t in prompts.split(",")),
            num_prompts=num_prompts, new_tokens=new_tokens or 256, threads=threads, draft_tokens=draft_tokens,
            dtype=dtype)
        exact_settings.check()
        results = run_exact_bench(exact_settings, out)
        write_bench_outputs(out, results, exact_markdown(results, command), out / "samples.jsonl")
        return
    if batch_sizes is not None:
        from riverllm.bench.batch import BatchBenchSettings, batch_markdown, run_batch_bench

        if not model:
            fail("--batch-sizes needs --model (a real model: exits depend on real weights)")
        try:
            sizes = tuple(int(x) for x in batch_sizes.split(",") if x.strip())
        except ValueError:
            fail(f"--batch-sizes takes comma-separated integers, e.g. 1,4,8,16; got '{batch_sizes}'")
        batch_settings = BatchBenchSettings(
            model=model, batch_sizes=sizes,
            methods=tuple(m.strip() for m in (methods or "dense,w4,river:0.9,river:0.9@batch-min").split(",")
                          if m.strip()),
            prompts=prompts if prompts != "random" else "gsm8k", num_prompts=max(num_prompts, max(sizes or (1,))),
            new_tokens=new_tokens or 32, check_tokens=check_tokens, threads=threads, dtype=dtype)
        batch_settings.check()
        results = run_batch_bench(batch_settings)
        write_bench_outputs(out, results, batch_markdown(results, command))
        return
    if threads:
        import torch

        torch.set_num_threads(threads)

    settings = BenchSettings(
        shapes=tuple(s.strip() for s in shapes.split(",") if s.strip()) if shapes else (), model=model,
        device=device, dtype=dtype, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        prefill_tokens=prefill_tokens, repeats=repeats, profile=profile, tau=tau, prompts=prompts,
        num_prompts=num_prompts, max_backbone_layers=max_backbone_layers, group_size=group_size, graphs=graphs,
        hf_compile=hf_compile, copy_mib=copy_mib, seed=seed)
    results = run_bench(settings)
    paths = write_outputs(results, out, command=command)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"written: {paths['json']}, {paths['markdown']}, {paths['plot']}", err=True)


@app.command("calibrate")
def calibrate_command(
    model: str = ModelOption,
    target_agree: Optional[float] = typer.Option(None, "--target-agree", help="least share of positions whose "
                                                 "greedy token equals dense's, in (0, 1], e.g. 0.9"),
    target_kl: Optional[float] = typer.Option(None, "--target-kl", help="largest mean KL(dense || river) in "
                                              "nats, > 0, e.g. 0.05"),
    target_speed: Optional[str] = typer.Option(None, "--target", help="speed: instead of a fidelity target, time "
                                               "lossless decoding over a grid of tau and draft lengths on held-out "
                                               "text and keep the fastest (`--method lossless` then uses it)"),
    text: Optional[Path] = typer.Option(None, "--text", help="calibration text file (default: held-out Brown "
                                        "corpus windows, disjoint from what `riverllm eval` reads)"),
    tokens: int = typer.Option(256, "--tokens", help="positions scored (more: a steadier tau, a slower run)"),
    bits: int = typer.Option(4, help="river bit width to calibrate: 2, 3, 4 or 8"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size"),
    as_json: bool = typer.Option(False, "--json", help="print the profile entry as JSON"),
    device: Optional[str] = DeviceOption,
) -> None:
    """Find the lowest tau that meets a fidelity target (or, with --target speed, lossless decoding's fastest
    tau and draft length) and save it as this model's default."""
    from riverllm.calibrate import Target, calibrate_and_save, read_text_file, summary_lines

    if target_speed is not None and target_speed != "speed":
        fail(f"--target takes 'speed' (lossless decoding's fastest tau and draft length), got '{target_speed}'")
    if target_speed:
        if target_agree is not None or target_kl is not None or text is not None:
            fail("--target speed times lossless decoding; it takes no --target-agree, --target-kl or --text")
        from riverllm.calibrate import calibrate_speed_and_save, speed_summary_lines

        lm = load_lm(model, device, bits, group_size, quiet=as_json)
        result, path = calibrate_speed_and_save(lm, progress=not as_json)
        if as_json:
            typer.echo(json.dumps({"model": model, "profile": str(path), **result.profile_entry()}))
            return
        for line in speed_summary_lines(result, path):
            typer.echo(line)
        return
    target = Target.from_options(target_agree, target_kl)  # bad flags fail before the slow load
    if text is not None:
        read_text_file(text)
    if tokens < 1:
        raise RiverError(f"--tokens must be at least 1, got {tokens}")
    lm = load_lm(model, device, bits, group_size, quiet=as_json)
    result, path = calibrate_and_save(lm, target, text, tokens, progress=not as_json)
    if as_json:
        typer.echo(json.dumps({"model": model, "profile": str(path), **result.profile_entry()}))
        return
    for line in summary_lines(result, path):
        typer.echo(line)


def main() -> None:
    try:
        app()
    except RiverError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
