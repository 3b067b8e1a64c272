"""`riverllm bench --model M --exact`: exact (dense-output) decoding, side by side.

What a user who needs the dense model's exact output can run: our `dense`, our `lossless`
(River drafts, the backbone verifies), and transformers' own exact accelerations on the same
weights: plain greedy `generate`, prompt-lookup decoding (`prompt_lookup_num_tokens`), and
assisted generation with a smaller model of the same tokenizer as the drafter. Lossy River runs
beside them for reference. Every method decodes the same prompts (HumanEval and GSM8K, chat
template), greedy, up to `new_tokens` tokens or EOS; a method's speed is its new tokens over the
wall-clock time of its whole generation calls (prefill included, as a user waits for it), summed
over the prompts. Each output is compared token for token with our dense output.

Methods are interleaved prompt by prompt, so a slow patch of a shared machine hits every method
alike. Records go to samples.jsonl as they finish (one line per prompt and method): an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from riverllm.bench.batch import environment, environment_line
from riverllm.bench.records import RecordLog
from riverllm.cpu import parse_dtype
from riverllm.errors import RiverError

HF_METHODS = ("hf", "hf-lookup")  # plus hf-assisted:MODEL
# lossless:0.9+lookup (or +lookup7): lossless with prompt-lookup drafts where the context matches
# (`draft_lookup`: the library's default count, or 7), River's drafts elsewhere. Plain lossless:0.9
# here is River's drafts alone (draft_lookup=0), so that each name means one thing.
LOOKUP = re.compile(r"\+lookup(\d+)?$")


@dataclass(frozen=True)
class ExactBenchSettings:
    model: str
    methods: tuple[str, ...] = ("dense", "river:0.9", "lossless:0.9", "lossless:0.9+lookup", "hf", "hf-lookup")
    tasks: tuple[str, ...] = ("humaneval", "gsm8k")
    num_prompts: int = 20  # per task
    new_tokens: int = 256
    threads: int | None = None
    lookup_tokens: int = 10  # transformers' prompt_lookup_num_tokens
    draft_tokens: int | None = None  # lossless drafts per cycle (None: the library default)
    dtype: str | None = None  # float32 | bfloat16 | float16 for every model here (None: float32 on CPU)

    def check(self) -> None:
        from riverllm.policy import Method

        if self.num_prompts < 1 or self.new_tokens < 2:
            raise RiverError("--num-prompts must be at least 1 and --new-tokens at least 2")
        for task in self.tasks:
            if task not in ("humaneval", "gsm8k"):
                raise RiverError(f"with --exact, --prompts takes humaneval and/or gsm8k, got '{task}'")
        for name in self.methods:
            if name in HF_METHODS or name.startswith("hf-assisted:"):
                continue
            base = LOOKUP.sub("", name)
            if base != name and Method.parse(base).kind != "lossless":
                raise RiverError(f"'{name}': +lookup applies to lossless methods only, e.g. lossless:0.9+lookup")
            Method.parse(base)
        parse_dtype(self.dtype)
        if "dense" not in self.methods:
            raise RiverError("with --exact, --methods must include dense (every output is compared with it)")


def hf_generate(lm, name: str, ids: list[int], new_tokens: int, lookup_tokens: int, assistants: dict) -> list[int]:
    """transformers' greedy `generate` on the same weights: plain, prompt lookup, or assisted."""
    model = lm.model
    input_ids = torch.tensor([ids], device=lm.engine.device)
    options = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=list(lm.eos_token_ids()),
                   pad_token_id=lm.tokenizer.pad_token_id or 0, attention_mask=torch.ones_like(input_ids),
                   temperature=None, top_p=None, top_k=None)
    if name == "hf-lookup":
        options["prompt_lookup_num_tokens"] = lookup_tokens
    elif name.startswith("hf-assisted:"):
        options["assistant_model"] = assistants[name]
    with torch.no_grad():
        output = model.generate(input_ids, **options)
    return output[0, len(ids):].tolist()


def generate_options(settings: ExactBenchSettings, name: str) -> dict:
    """Our method name -> `RiverLM.generate` options."""
    if not name.startswith("lossless"):
        return {"method": name}
    lookup = LOOKUP.search(name)
    return {"method": LOOKUP.sub("", name), "draft_tokens": settings.draft_tokens,
            "draft_lookup": (int(lookup[1]) if lookup[1] else None) if lookup else 0}


def load_assistants(methods: tuple[str, ...], device, dtype: torch.dtype | None = None) -> dict:
    from riverllm.loading import load_model

    assistants = {}
    for name in methods:
        if name.startswith("hf-assisted:"):
            model, _ = load_model(name.split(":", 1)[1], device=str(device), dtype=dtype, progress=False)
            assistants[name] = model
    return assistants


def run_exact_bench(settings: ExactBenchSettings, out: Path, progress: bool = True) -> dict:
    import riverllm
    from riverllm.bench.batch import bench_prompts

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    lm = riverllm.load(settings.model, dtype=parse_dtype(settings.dtype), progress=progress)
    assistants = load_assistants(settings.methods, lm.engine.device, lm.engine.dtype)
    prompts = bench_prompts(settings.tasks, settings.num_prompts)
    log = RecordLog(out / "samples.jsonl", ("prompt", "method"))
    dtype = str(lm.engine.dtype).replace("torch.", "")
    recorded = {r.get("dtype", "float32") for r in log.records.values()}
    if recorded - {dtype}:
        raise RiverError(f"{out} holds records taken in {', '.join(sorted(recorded))}, not {dtype}: "
                         "resume with the same dtype or write to another folder")
    # Records from before attention ran in float32 on a CPU (2026-12-06) computed it in their dtype.
    attention = str(lm.engine.attention_dtype).replace("torch.", "")
    if any(r.get("attention_dtype", r.get("dtype", "float32")) != attention for r in log.records.values()):
        raise RiverError(f"{out} holds records whose attention ran in another dtype than {attention} (an older "
                         "riverllm): their outputs and timings do not compare with this one's; write to another folder")
    # Warm-up: builds the river and the low-bit head, touches every kernel once (not timed).
    for name in settings.methods:
        if not name.startswith("hf"):
            lm.generate(prompts[0][1], max_new_tokens=3, **generate_options(settings, name))

    todo = [(key, prompt, name) for key, prompt in prompts for name in settings.methods if (key, name) not in log]
    with tqdm(total=len(todo), desc="exact bench", unit="run", disable=not progress) as bar:
        for key, prompt, name in todo:
            bar.set_postfix_str(f"{key} {name}")
            ids = lm.encode(prompt)
            start = time.perf_counter()
            extra = {}
            if name.startswith("hf"):
                tokens = hf_generate(lm, name, ids, settings.new_tokens, settings.lookup_tokens, assistants)
                exits = None
            else:
                result = lm.generate(prompt, max_new_tokens=settings.new_tokens, **generate_options(settings, name))
                tokens, exits = result.token_ids, result.mean_exit_layer
                extra = result.extra.get("drafting", {})
            seconds = time.perf_counter() - start
            log.append(dict(prompt=key, method=name, tokens=tokens, seconds=seconds, mean_exit_layer=exits, dtype=dtype,
                            attention_dtype=attention, **extra))
            bar.update()
    results = summarize(settings, [key for key, _ in prompts], log.records, lm.num_layers)
    results["dtype"] = dtype
    return results


def summarize(settings: ExactBenchSettings, keys: list[str], records: dict, num_layers: int) -> dict:
    rows = []
    for name in settings.methods:
        runs = [records[(key, name)] for key in keys if (key, name) in records]
        if not runs:
            continue
        same = [records[(r["prompt"], name)]["tokens"] == records[(r["prompt"], "dense")]["tokens"]
                for r in runs if (r["prompt"], "dense") in records]
        tokens = sum(len(r["tokens"]) for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        row = dict(method=name, prompts=len(runs), tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                   identical_to_dense=sum(same), compared=len(same))
        if runs[0].get("verifies"):
            drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
            verifies = sum(r["verifies"] for r in runs)
            row.update(acceptance_rate=accepted / max(drafted, 1), tokens_per_verify=(accepted + verifies) / verifies,
                       drafts_per_verify=drafted / verifies,
                       looked_up_share=sum(r.get("looked_up", 0) for r in runs) / max(drafted, 1))
        if runs[0].get("mean_exit_layer") is not None:
            row["mean_exit_layer"] = sum(r["mean_exit_layer"] for r in runs) / len(runs)
        rows.append(row)
    by_name = {r["method"]: r for r in rows}
    exact = [r for r in rows if r["method"] == "dense" or r["method"].startswith("hf")]
    fastest_exact = max(exact, key=lambda r: r["tokens_per_s"]) if exact else None
    for row in rows:
        row["vs_dense"] = row["tokens_per_s"] / by_name["dense"]["tokens_per_s"] if "dense" in by_name else None
        row["vs_fastest_exact_baseline"] = row["tokens_per_s"] / fastest_exact["tokens_per_s"] if fastest_exact else None
    return dict(kind="exact", settings=asdict(settings), rows=rows, num_layers=num_layers,
                fastest_exact_baseline=fastest_exact["method"] if fastest_exact else None, environment=environment())


def exact_markdown(results: dict, command: str = "") -> str:
    env, settings = results["environment"], results["settings"]
    lines = [f"# Exact decoding: {settings['model']}", "",
             environment_line(env, "at the end") + (f" Weights in {results['dtype']}." if "dtype" in results else ""),
             f"{settings['num_prompts']} prompts each of {', '.join(settings['tasks'])} (chat template), greedy, up "
             f"to {settings['new_tokens']} new tokens or EOS; tok/s = new tokens / wall time of the whole "
             "generation (prefill included), summed over prompts; methods interleaved prompt by prompt.", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| method | exact? | tok/s | vs dense | vs fastest exact baseline | identical to dense | "
              "acceptance | tokens per backbone pass | mean exit layer |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        exact = "yes" if (r["method"] == "dense" or r["method"].startswith(("hf", "lossless"))) else "no"
        acceptance = f"{100 * r['acceptance_rate']:.0f}%" if "acceptance_rate" in r else "-"
        per_pass = f"{r['tokens_per_verify']:.2f}" if "tokens_per_verify" in r else "-"
        exit_layer = f"{r['mean_exit_layer']:.1f}/{results['num_layers']}" if "mean_exit_layer" in r else "-"
        lines.append(f"| {r['method']} | {exact} | {r['tokens_per_s']:.2f} | {r['vs_dense']:.2f}x | "
                     f"{r['vs_fastest_exact_baseline']:.2f}x | {r['identical_to_dense']}/{r['compared']} | "
                     f"{acceptance} | {per_pass} | {exit_layer} |")
    lines += ["", f"Fastest exact baseline: {results['fastest_exact_baseline']}. For lossless methods the mean exit "
              "layer is over every emitted token (backbone tokens count as the full depth)."]
    return "\n".join(lines) + "\n"
