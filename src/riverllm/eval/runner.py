"""The sweep: every task under every method, one sample at a time, resumable.

    config = EvalConfig.parse(tasks="gsm8k,ppl", methods="dense,w4,river:0.9", out_dir="runs/x", limit=20)
    summary = run_eval(riverllm.load("smollm2-135m"), config)

Layout of the output directory:

    run.json                          model, bits, group size, device, dtype and each task's settings
    samples/<task>/<method>.jsonl     one record per finished sample (see Task.run)
    summary.json, report.md, pareto.png, exits.png   (report.py)

Resuming: each record is appended and flushed as soon as its sample is done. A second run with
the same directory skips every (task, method, sample id) already there and redoes only the
rest (a line cut off by a crash is dropped and redone). A run with other settings for the same
model or task (another model, max-new-tokens, ppl window ...) is refused, since its records would
not be comparable; new tasks and methods can be added to a directory at any time, and a larger
--limit extends a run (every limit picks a prefix of one fixed order).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riverllm.errors import RiverError
from riverllm.eval.metrics import MetricContext, load_metric_providers
from riverllm.eval.report import add_speedups, columns, exit_histogram, summary_row, write_outputs
from riverllm.files import write_text_atomic
from riverllm.eval.sandbox import SandboxLimits, ensure_sandbox
from riverllm.eval.tasks import TASK_NAMES, Sample, Task, make_task
from riverllm.policy import Method

if TYPE_CHECKING:
    from riverllm.api import RiverLM

DEFAULT_TASKS = "humaneval,gsm8k,asdiv,ppl"
DEFAULT_METHODS = "dense,w4,river:0.8,river:0.9,river:0.95"
# Measured on the 2-core CPU (docs/results/engine_cpu): batches of 8 give most of the throughput
# of 16 at half the wait for a resumable chunk.
DEFAULT_BATCH_SIZE = 8


@dataclass
class EvalConfig:
    tasks: list[str]
    methods: list[str]  # as typed; "river" gets the model's default tau pinned at run time
    out_dir: Path
    limit: int | None = None  # samples per task (ppl: windows)
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per task; missing: the task's default
    ppl_tokens: int = 4096  # tokens scored by ppl in all
    ppl_window: int = 256  # tokens scored per window (after a 16-token prefill)
    seed: int = 0  # picks asdiv's subset under --limit
    metrics: list[str] | None = None  # extra metric columns to compute (metrics.py); None: every registered one
    batch_size: int = DEFAULT_BATCH_SIZE  # samples decoded together (per-row exits: same records as alone)
    progress: bool = True
    sandbox: SandboxLimits = SandboxLimits()
    unsafe_exec: bool = False  # run HumanEval's code without OS isolation where none is available

    @classmethod
    def parse(cls, tasks: str = DEFAULT_TASKS, methods: str = DEFAULT_METHODS, out_dir: str | Path = "eval-out",
              limit: int | None = None, max_new_tokens: str | None = None, metrics: str | None = None,
              **options: Any) -> "EvalConfig":
        """Build a config from command-line strings, checking everything that needs no model."""
        task_list = _split(tasks, "tasks")
        for name in task_list:
            if name not in TASK_NAMES:
                raise RiverError(f"unknown task '{name}': choose from {', '.join(TASK_NAMES)}")
        method_list = _split(methods, "methods")
        for name in method_list:
            Method.parse(name)  # raises a RiverError naming the valid methods
        if limit is not None and limit < 1:
            raise RiverError(f"--limit must be at least 1, got {limit}")
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise RiverError(f"--out {out} is a file; pass a directory (it is created if missing)")
        config = cls(task_list, method_list, out, limit, parse_max_new_tokens(max_new_tokens, task_list),
                     metrics=parse_metrics(metrics), **options)
        if config.ppl_tokens < 1 or config.ppl_window < 1:
            raise RiverError("--ppl-tokens and --ppl-window must be at least 1")
        if config.batch_size < 1:
            raise RiverError(f"--batch-size must be at least 1, got {config.batch_size}")
        if "humaneval" in task_list:
            ensure_sandbox(config.unsafe_exec)  # refuse before the model loads, not at the first problem
        return config


def _split(text: str, what: str) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise RiverError(f"no {what} given: pass a comma-separated list")
    return items


def parse_max_new_tokens(text: str | None, tasks: list[str]) -> dict[str, int]:
    """"64" (every task) or "humaneval=512,gsm8k=256" (per task) -> {task: tokens}."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {task: _positive(int(text)) for task in tasks}
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        values = {name.strip(): _positive(int(value)) for name, value in pairs}
    except ValueError:
        raise RiverError(f"--max-new-tokens takes N or TASK=N,TASK=N (N >= 1), got '{text}'") from None
    unknown = set(values) - set(TASK_NAMES)
    if unknown:
        raise RiverError(f"--max-new-tokens names unknown task(s) {', '.join(sorted(unknown))}; "
                         f"tasks are {', '.join(TASK_NAMES)}")
    return values


def parse_metrics(text: str | None) -> list[str] | None:
    """"match,agree" -> those metric columns; "none" -> no extra column; None -> every registered one."""
    if text is None:
        return None
    if text.strip() == "none":
        return []
    names = _split(text, "metrics")
    known = [provider.name for provider in load_metric_providers()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RiverError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(known)}, or none")
    return names


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError(value)
    return value


# --- methods ------------------------------------------------------------------------------------


def resolve_methods(names: list[str], lm: RiverLM) -> list[Method]:
    """Parse the methods with the model's bit width, pinning the default tau into names that left
    it out ("river" -> "river:0.9"), so that every record names the threshold it ran with."""
    methods: dict[str, Method] = {}
    for name in names:
        method = Method.parse(name, lm.quant.bits)
        if method.uses_tau and method.tau is None:
            method = dataclasses.replace(method, tau=lm.default_tau(method.bits))
        methods.setdefault(method.name, method)
    return list(methods.values())


# --- records on disk ----------------------------------------------------------------------------


def records_path(out_dir: Path, task: str, method: str) -> Path:
    return out_dir / "samples" / task / (re.sub(r"[^\w.@-]", "_", method) + ".jsonl")


def load_records(path: Path) -> dict[str, dict]:
    """The finished records in a JSONL file, by sample id. A last line without its newline was cut
    off by a crash mid-write: it is removed from the file (so appends start on a fresh line) and
    its sample is redone."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        complete = data.rfind(b"\n") + 1
        with path.open("r+b") as file:
            file.truncate(complete)
        data = data[:complete]
    records = {}
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["id"]] = record
    return records


def append_record(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()


def check_settings(out_dir: Path, settings: dict) -> dict:
    """Compare this run's settings with run.json (if the directory holds a run) and store the union."""
    path = out_dir / "run.json"
    if not path.exists():
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
        return settings
    saved = {"kernels": "torch", **json.loads(path.read_text())}  # runs from before --kernels used torch's
    for key in ("model", "bits", "group_size", "device", "dtype", "kernels"):
        if saved.get(key) != settings[key]:
            raise RiverError(f"{out_dir} holds a run with {key}={saved.get(key)}, not {settings[key]}: "
                             "pass another --out, or delete that directory to start over")
    for task, task_settings in settings["tasks"].items():
        if task in saved["tasks"] and saved["tasks"][task] != task_settings:
            raise RiverError(f"{out_dir} holds {task} results made with {saved['tasks'][task]}, not {task_settings}: "
                             "pass another --out, or the same settings to resume")
    merged = {**saved, "tasks": {**saved["tasks"], **settings["tasks"]}}
    write_text_atomic(path, json.dumps(merged, indent=2) + "\n")
    return merged


# --- the sweep ----------------------------------------------------------------------------------


def run_eval(lm: RiverLM, config: EvalConfig) -> dict:
    """Run every task under every method (skipping samples already in config.out_dir), then write
    summary.json, report.md, pareto.png and exits.png. Returns the summary."""
    from tqdm import tqdm

    tasks = {name: make_task(name, config.ppl_tokens, config.ppl_window, config.sandbox, config.unsafe_exec) for name in config.tasks}
    methods = resolve_methods(config.methods, lm)
    task_settings = {name: task.settings(config.max_new_tokens.get(name)) for name, task in tasks.items()}
    config.out_dir.mkdir(parents=True, exist_ok=True)
    settings = check_settings(config.out_dir, {
        "model": lm.name, "num_layers": lm.num_layers, "bits": lm.quant.bits, "group_size": lm.quant.group_size,
        "device": str(lm.engine.device), "dtype": str(lm.engine.dtype).removeprefix("torch."), "kernels": lm.kernels,
        "tasks": task_settings,
    })
    samples = {name: task.samples(config.limit, config.seed, config.progress) for name, task in tasks.items()}

    # What is left to do, so that the progress bar's ETA covers the whole sweep.
    plan: list[tuple[Task, Method, Path, list[Sample]]] = []
    for name, task in tasks.items():
        for method in methods:
            path = records_path(config.out_dir, name, method.name)
            done = load_records(path)
            plan.append((task, method, path, [s for s in samples[name] if s.id not in done]))
    with tqdm(total=sum(len(todo) for *_, todo in plan), desc="eval", unit="sample", file=sys.stderr,
              disable=not config.progress, dynamic_ncols=True) as bar:
        for task, method, path, todo in plan:
            if todo:
                path.parent.mkdir(parents=True, exist_ok=True)
                if method.needs_river:
                    lm.river(method.bits)  # build it now, so that no sample's time includes building it
            # The prior strategies decide per batch (a row would depend on its neighbours): alone.
            size = config.batch_size if method.kind in ("dense", "w", "river", "static", "mixed") else 1
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                bar.set_postfix_str(f"{task.name} {method.name} {chunk[0].id}" + (f" +{len(chunk) - 1}" if len(chunk) > 1 else ""))
                for record in task.run_batch(lm, chunk, method, task_settings[task.name]):
                    append_record(path, {"task": task.name, "method": method.name, **record})
                bar.update(len(chunk))

    summary = summarize(config.out_dir, tasks, [m.name for m in methods], samples, settings, lm, config.metrics,
                        config.batch_size)
    write_outputs(config.out_dir, summary)
    return summary


def summarize(out_dir: Path, tasks: dict[str, Task], methods: list[str], samples: dict[str, list[Sample]],
              settings: dict, lm: RiverLM | None = None, metrics: list[str] | None = None,
              batch_size: int = 1) -> dict:
    """The summary of this run's samples (those of the current --limit) from the JSONL files, with
    the extra columns of the metric providers named in `metrics` (None: all of them)."""
    num_layers = settings["num_layers"]
    records: dict[tuple[str, str], list[dict]] = {}
    for name in tasks:
        for method in methods:
            by_id = load_records(records_path(out_dir, name, method))
            records[(name, method)] = [by_id[s.id] for s in samples[name] if s.id in by_id]
    rows = {key: summary_row(key[0], tasks[key[0]].metric, key[1], recs, tasks[key[0]].aggregate(recs), num_layers)
            for key, recs in records.items()}
    add_speedups(rows)
    providers = [p for p in load_metric_providers() if metrics is None or p.name in metrics]
    context = MetricContext(records, tasks, methods, rows, out_dir, lm, settings, batch_size)
    for provider in providers:
        values = provider.compute(context)
        for key, row in rows.items():
            row[provider.name] = values.get(key)
    return {
        "model": settings["model"],
        "num_layers": num_layers,
        "settings": settings,
        "tasks": [{"name": name, "metric": task.metric, "higher_is_better": task.higher_is_better,
                   "samples": len(samples[name])} for name, task in tasks.items()],
        "methods": methods,
        "columns": columns(providers),
        "results": list(rows.values()),
        "exit_histograms": {name: {method: exit_histogram(records[(name, method)], num_layers) for method in methods}
                            for name in tasks},
    }
