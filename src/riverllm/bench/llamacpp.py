"""`riverllm bench --model M --llama-cpp`: riverllm against llama.cpp on the same GGUF file.

A CPU user's real alternative to riverllm is llama.cpp. This bench decodes the same prompts
(HumanEval and GSM8K, chat template, greedy, batch 1) with llama.cpp (through llama-cpp-python,
the `ggml` extra, which builds it for this CPU) and with riverllm's methods on both of its kernel
sets: "torch" (the GGUF dequantized, PyTorch's kernels) and "ggml" (the GGUF's own blocks,
llama.cpp's kernels; the twins stay on PyTorch's int4 kernel). A method is written `METHOD`,
`METHOD+ggml`, and with `+head4` for a 4-bit LM head (`--head-bits 4`), e.g. `river:0.9+ggml+head4`.

Speed is decode tok/s: tokens after the first over their wall time (the first token pays the
prefill, which is reported apart), the figure llama.cpp's `llama-bench` calls tg. Every thread
count in the settings runs the whole list, methods interleaved prompt by prompt so a slow patch
of a shared machine hits all of them alike. Records go to samples.jsonl as they finish: an
interrupted run resumes where it stopped. Tokens are compared with llama.cpp's and with
riverllm's own dense ones.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from riverllm.bench.batch import bench_prompts, environment, environment_line, split_method
from riverllm.bench.records import RecordLog
from riverllm.errors import RiverError

LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class LlamaCppBenchSettings:
    model: str
    methods: tuple[str, ...] = (LLAMA_CPP, "dense", "dense+ggml", "w4+ggml", "river:0.9", "river:0.9+ggml")
    threads: tuple[int, ...] = (1, 2)
    tasks: tuple[str, ...] = ("humaneval", "gsm8k")
    num_prompts: int = 5  # per task
    new_tokens: int = 128

    def check(self) -> None:
        from riverllm.policy import Method

        if self.num_prompts < 1 or self.new_tokens < 2:
            raise RiverError("--num-prompts must be at least 1 and --new-tokens at least 2")
        if not self.threads or min(self.threads) < 1:
            raise RiverError("thread counts must be at least 1")
        for name in self.methods:
            if name != LLAMA_CPP:
                Method.parse(split_method(name)[0])


class LlamaCpp:
    """llama.cpp's greedy decoding of token ids, one `Llama` per thread count (they share the mmap)."""

    def __init__(self, gguf_path: Path, context: int):
        try:
            import llama_cpp
        except ImportError:
            raise RiverError("the llama.cpp baseline needs llama-cpp-python: pip install 'riverllm[ggml]'") from None
        self.llama_cpp, self.path, self.context = llama_cpp, gguf_path, context
        self.models: dict[int, object] = {}

    def model(self, threads: int):
        if threads not in self.models:
            self.models[threads] = self.llama_cpp.Llama(str(self.path), n_ctx=self.context, n_threads=threads,
                                                        n_threads_batch=threads, verbose=False)
        return self.models[threads]

    def generate(self, ids: list[int], new_tokens: int, threads: int, stop: set[int]) -> tuple[list[int], list[float]]:
        model = self.model(threads)
        model.reset()  # no prompt-prefix reuse from the previous prompt: the prefill is timed whole
        tokens, times = [], []
        start = time.perf_counter()
        for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
            now = time.perf_counter()
            times.append(now - start)
            start = now
            if token in stop:
                break
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return tokens, times[:max(len(tokens), 1)]


def run_llamacpp_bench(settings: LlamaCppBenchSettings, out: Path, progress: bool = True) -> dict:
    import riverllm

    settings.check()
    lm = riverllm.load(settings.model, progress=progress)
    if lm.gguf_path is None:
        raise RiverError("the llama.cpp comparison needs a GGUF model (a packaged name or a .gguf file)")
    llama = LlamaCpp(lm.gguf_path, context=2048) if LLAMA_CPP in settings.methods else None
    prompts = bench_prompts(settings.tasks, settings.num_prompts)
    log = RecordLog(out / "samples.jsonl", ("threads", "prompt", "method"))
    stop = set(lm.eos_token_ids())
    # Warm-up: builds the river and the ggml modules, touches every kernel once (not timed).
    for name in settings.methods:
        if name != LLAMA_CPP:
            method, kernels, options = split_method(name)
            lm.use_kernels(kernels)
            lm.generate(prompts[0][1], method=method, max_new_tokens=3, **options)
    todo = [(threads, key, prompt, name) for threads in settings.threads for key, prompt in prompts
            for name in settings.methods if (threads, key, name) not in log]
    with tqdm(total=len(todo), desc="llama.cpp bench", unit="run", disable=not progress) as bar:
        for threads, key, prompt, name in todo:
            bar.set_postfix_str(f"{threads}t {key} {name}")
            torch.set_num_threads(threads)
            ids = lm.encode(prompt)
            exits = None
            if name == LLAMA_CPP:
                tokens, times = llama.generate(ids, settings.new_tokens, threads, stop)
            else:
                method, kernels, options = split_method(name)
                lm.use_kernels(kernels)
                result = lm.generate(prompt, method=method, max_new_tokens=settings.new_tokens, **options)
                tokens, times, exits = result.token_ids, result.token_times, result.mean_exit_layer
            log.append(dict(threads=threads, prompt=key, method=name, tokens=tokens, prefill_seconds=times[0],
                            decode_seconds=sum(times[1:]), mean_exit_layer=exits))
            bar.update()
    return summarize(settings, [key for key, _ in prompts], log.records, lm.num_layers)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(settings: LlamaCppBenchSettings, keys: list[str], records: dict, num_layers: int) -> dict:
    rows = []
    for threads in settings.threads:
        for name in settings.methods:
            runs = [records[(threads, key, name)] for key in keys if (threads, key, name) in records]
            if not runs:
                continue
            decode_tokens = sum(max(len(r["tokens"]) - 1, 0) for r in runs)
            decode_seconds = sum(r["decode_seconds"] for r in runs)
            row = dict(threads=threads, method=name, prompts=len(runs), decode_tokens=decode_tokens,
                       decode_tokens_per_s=decode_tokens / max(decode_seconds, 1e-9),
                       prefill_seconds_median=statistics.median(r["prefill_seconds"] for r in runs))
            for reference in (LLAMA_CPP, "dense"):
                pairs = [(r["tokens"], records[(threads, r["prompt"], reference)]["tokens"]) for r in runs
                         if (threads, r["prompt"], reference) in records]
                if pairs:
                    row[f"identical_to_{reference}"] = sum(a == b for a, b in pairs)
                    row[f"prefix_with_{reference}"] = statistics.mean(_common_prefix(a, b) / max(len(b), 1)
                                                                        for a, b in pairs)
                    row["compared"] = len(pairs)
            if runs[0].get("mean_exit_layer") is not None:
                row["mean_exit_layer"] = statistics.mean(r["mean_exit_layer"] for r in runs)
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["threads"] == row["threads"] and r["method"] == LLAMA_CPP), None)
        row["vs_llama_cpp"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
    return dict(kind="llama.cpp", settings=asdict(settings), rows=rows, num_layers=num_layers,
                environment=environment())


def llamacpp_markdown(results: dict, command: str = "") -> str:
    env, settings = results["environment"], results["settings"]
    lines = [f"# riverllm against llama.cpp: {settings['model']}", "",
             environment_line(env, "at the end", threads=False),
             f"{settings['num_prompts']} prompts each of {', '.join(settings['tasks'])} (chat template), greedy, "
             f"batch 1, up to {settings['new_tokens']} new tokens or EOS. Decode tok/s = tokens after the first over "
             "their wall time (llama-bench's tg); methods interleaved prompt by prompt. `+ggml`: riverllm on "
             "ggml's kernels over the GGUF's own blocks (twins on PyTorch's int4 kernel); without it, PyTorch's "
             "kernels over the dequantized float32 weights.", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| threads | method | decode tok/s | vs llama.cpp | prefill s (median) | identical to llama.cpp | "
              "identical to dense | mean exit layer |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        def same(reference: str) -> str:
            if f"identical_to_{reference}" not in r:
                return "-"
            return f"{r[f'identical_to_{reference}']}/{r['compared']} ({100 * r[f'prefix_with_{reference}']:.0f}% prefix)"
        vs = f"{r['vs_llama_cpp']:.2f}x" if r["vs_llama_cpp"] is not None else "-"
        exit_layer = f"{r['mean_exit_layer']:.1f}/{results['num_layers']}" if "mean_exit_layer" in r else "-"
        lines.append(f"| {r['threads']} | {r['method']} | {r['decode_tokens_per_s']:.2f} | {vs} | "
                     f"{r['prefill_seconds_median']:.2f} | {same(LLAMA_CPP)} | {same('dense')} | {exit_layer} |")
    lines += ["", "prefix: the mean share of the reference's tokens that a method's output repeats before the "
              "first difference."]
    return "\n".join(lines) + "\n"
