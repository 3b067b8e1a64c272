"""`riverllm bench --model M --batch-sizes 1,4,8,16`: throughput of batched decoding, and whether a
batch really is a set of independent requests.

For each method (dense, w4, river:TAU with per-row exits, river:TAU with the paper's batch-min
rule) and batch size B, the prompts are decoded B at a time, every row generating exactly
`new_tokens` tokens (EOS ignored, so that every step carries B rows); the aggregate decode
throughput is rows x (new_tokens - 1) tokens over the time of the steps after the prefill, the
median over the batches. The same run then checks batch invariance: every prompt decoded alone
and inside a batch of the largest size, greedy, with EOS and up to `check_tokens` tokens; a prompt
counts as invariant when its tokens and exit layers are identical.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from riverllm.errors import RiverError
from riverllm.policy import EXIT_RULES


@dataclass(frozen=True)
class BatchBenchSettings:
    model: str
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    methods: tuple[str, ...] = ("dense", "w4", "river:0.9", "river:0.9@batch-min")
    prompts: str = "gsm8k"  # gsm8k | humaneval
    num_prompts: int = 16
    new_tokens: int = 32
    check_tokens: int = 128  # tokens of the invariance check (0: skip it)
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    dtype: str | None = None  # float32 | bfloat16 | float16 (None: float32 on CPU)

    def check(self) -> None:
        from riverllm.cpu import parse_dtype

        parse_dtype(self.dtype)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise RiverError("--batch-sizes takes positive integers, e.g. 1,4,8,16")
        if self.num_prompts < max(self.batch_sizes):
            raise RiverError(f"--num-prompts ({self.num_prompts}) must be at least the largest batch size "
                             f"({max(self.batch_sizes)})")
        if self.new_tokens < 2:
            raise RiverError("--new-tokens must be at least 2")
        if self.prompts not in ("gsm8k", "humaneval"):
            raise RiverError(f"with --batch-sizes, --prompts must be gsm8k or humaneval, got '{self.prompts}'")
        for name in self.methods:
            method_options(name)


VARIANTS = {"ggml": ("kernels", "ggml"), "head4": ("head_bits", 4)}


def split_method(name: str) -> tuple[str, str, dict]:
    """"river:0.9+ggml+head4" -> ("river:0.9", "ggml", {"head_bits": 4}); "dense" -> ("dense", "torch", {})."""
    method, *variants = name.split("+")
    options = {}
    for variant in variants:
        if variant not in VARIANTS:
            raise RiverError(f"unknown method variant '+{variant}' in '{name}' (known: +ggml, +head4)")
        key, value = VARIANTS[variant]
        options[key] = value
    return method, options.pop("kernels", "torch"), options


def method_options(name: str) -> tuple[str, dict]:
    """'river:0.9@batch-min+ggml' -> ("ggml", generate options: method, exit_rule, ...)."""
    base, kernels, options = split_method(name)
    method, _, rule = base.rpartition("@")
    if rule not in EXIT_RULES:  # river@K is a method (a fixed exit layer), not an exit rule
        method, rule = base, "per-row"
    return kernels, dict(method=method, exit_rule=rule, **options)


def task_prompts(kind: str, count: int) -> list:
    from riverllm.eval.tasks import make_task

    task = make_task(kind)
    return [task.prompt(sample, chat=True) for sample in task.samples(count, 0, progress=False)]


def bench_prompts(tasks: tuple[str, ...], count: int) -> list[tuple[str, str]]:
    """("task/i", prompt) for the first `count` prompts of each task."""
    return [(f"{task}/{i}", prompt) for task in tasks for i, prompt in enumerate(task_prompts(task, count))]


def decode_rate(results) -> tuple[float, int]:
    """(seconds of the decoding steps after the prefill, tokens they made) of one batch."""
    steps = max(len(r.token_times) for r in results)
    seconds = sum(results[0].token_times[1:steps])
    tokens = sum(len(r.token_ids) - 1 for r in results)
    return seconds, tokens


def run_batch_bench(settings: BatchBenchSettings, progress: bool = True) -> dict:
    import riverllm
    from riverllm.cpu import parse_dtype

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = environment()  # the load before this run adds its own

    lm = riverllm.load(settings.model, dtype=parse_dtype(settings.dtype), progress=progress)
    prompts = task_prompts(settings.prompts, settings.num_prompts)
    for name in settings.methods:
        kernels, options = method_options(name)
        lm.use_kernels(kernels)
        lm.generate(prompts[0], max_new_tokens=2, **options)  # builds the river, warms the kernels up

    rows = []
    total = len(settings.methods) * len(settings.batch_sizes)
    with tqdm(total=total, desc="batch bench", unit="run", disable=not progress) as bar:
        for name in settings.methods:
            kernels, options = method_options(name)
            lm.use_kernels(kernels)
            for size in settings.batch_sizes:
                bar.set_postfix_str(f"{name} x{size}")
                rates, exits = [], []
                for start in range(0, len(prompts) - size + 1, size):
                    results = lm.generate_batch(prompts[start:start + size], max_new_tokens=settings.new_tokens,
                                                ignore_eos=True, **options)
                    seconds, tokens = decode_rate(results)
                    rates.append(tokens / seconds)
                    exits += [e for r in results for e in r.exit_layers[1:]]
                rows.append(dict(method=name, batch_size=size, tokens_per_s=statistics.median(rates),
                                 tokens_per_s_min=min(rates), tokens_per_s_max=max(rates), batches=len(rates),
                                 mean_exit_layer=sum(exits) / len(exits)))
                bar.update()
    base = {r["method"]: r["tokens_per_s"] for r in rows if r["batch_size"] == min(settings.batch_sizes)}
    for row in rows:
        row["vs_smallest_batch"] = row["tokens_per_s"] / base[row["method"]]

    invariance = []
    if settings.check_tokens:
        size = max(settings.batch_sizes)
        for name in [m for m in settings.methods if "batch-min" not in m]:
            kernels, options = method_options(name)
            lm.use_kernels(kernels)
            options["max_new_tokens"] = settings.check_tokens
            alone = [lm.generate(p, **options) for p in tqdm(prompts, desc=f"alone {name}", disable=not progress)]
            batched = []
            for start in range(0, len(prompts), size):
                batched += lm.generate_batch(prompts[start:start + size], **options)
            same = [a.token_ids == b.token_ids and a.exit_layers == b.exit_layers for a, b in zip(alone, batched)]
            first_difference = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
                                for a, b in zip(alone, batched)]
            invariance.append(dict(method=name, batch_size=size, prompts=len(prompts), identical=sum(same),
                                   first_difference=first_difference))
    return dict(kind="batch", settings=asdict(settings), rows=rows, invariance=invariance, environment=started,
                dtype=str(lm.engine.dtype).replace("torch.", ""))


def environment() -> dict:
    """Where a real-model benchmark ran: torch, threads, CPU, load average (a shared machine's
    timings mean little without it) and date."""
    import os

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return dict(torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), load_average=load,
                date=time.strftime("%Y-%m-%d %H:%M"))


def environment_line(env: dict, when: str, threads: bool = True) -> str:
    """The machine line of a benchmark table: torch, threads, CPU, load average, date."""
    thread_part = f"{env['threads']} thread(s), " if threads else ""
    return (f"torch {env['torch']}, {thread_part}{env['machine']}, load average "
            f"{', '.join(f'{x:.2f}' for x in env['load_average'])} {when}, {env['date']}.")


def batch_markdown(results: dict, command: str = "") -> str:
    env = results["environment"]
    lines = [f"# Batched decoding: {results['settings']['model']}", "",
             environment_line(env, "at start") + (f" Weights in {results['dtype']}." if "dtype" in results else ""),
             f"{results['settings']['num_prompts']} {results['settings']['prompts']} prompts, "
             f"{results['settings']['new_tokens']} new tokens per row (EOS ignored), greedy.", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| method | batch | tok/s (median) | min | max | vs batch " + str(min(results["settings"]["batch_sizes"]))
              + " | mean exit layer |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s_min']:.2f} | "
                     f"{r['tokens_per_s_max']:.2f} | {r['vs_smallest_batch']:.2f}x | {r['mean_exit_layer']:.2f} |")
    if results["invariance"]:
        lines += ["", "Batch invariance (greedy, EOS on): prompts whose tokens and exit layers in a batch equal "
                  "their batch-1 run.", "", "| method | batch | identical | first differing token |", "|---|---|---|---|"]
        for r in results["invariance"]:
            differing = [f"#{i}: token {d}" for i, d in enumerate(r["first_difference"]) if d is not None]
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['identical']}/{r['prompts']} | "
                         f"{', '.join(differing) or '-'} |")
    return "\n".join(lines) + "\n"
