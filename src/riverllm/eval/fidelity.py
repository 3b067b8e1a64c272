"""The fidelity columns of `riverllm eval`: agree, kl and kernel, per (task, method).

Registered through the eval's metric hook (metrics.py). For every method, against dense, on the
texts the run already has (riverllm/fidelity.py defines the measures):

* ppl: the task's own Brown windows (16-token prefill, then the window teacher-forced);
* humaneval, gsm8k, asdiv: each sample's prompt followed by dense's own greedy answer from this
  run, so these need dense in the sweep (otherwise the cells stay empty).

`agree` is in percent, `kl` in nats per position. `kernel` names what ran the method's quantized
layers (QuantLinear.backend of the river it used: int4_cuda, int4_cpu, or dequant, HQQ's
dequantize-on-the-fly for widths without a kernel here); methods without a river show none.

Everything measured is cached under the run's directory, so a resumed run or a report rebuilt
without the model measures nothing twice:

    fidelity/reference/<task>/<sample>-<hash>.pt   dense's reference (final hidden states)
    fidelity/samples/<task>/<method>.jsonl         per sample: positions, agreeing, kl_sum
    fidelity/kernels.json                          method -> kernel
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from riverllm.eval.metrics import MetricContext, MetricProvider, RowKey, register_metric
from riverllm.files import write_text_atomic
from riverllm.eval.runner import append_record, load_records, records_path
from riverllm.eval.tasks import GenerationTask, Perplexity, Task
from riverllm.fidelity import Fidelity, References, Segment, measure

if TYPE_CHECKING:
    from riverllm.api import RiverLM


def task_segments(lm: RiverLM, task: Task, task_name: str, sample_ids: Iterable[str],
                  dense_records: dict[str, dict]) -> dict[str, Segment]:
    """Sample id -> the segment fidelity scores for it (samples dense did not answer are left out)."""
    samples = {sample.id: sample for sample in task.samples(None, 0, False)}
    segments = {}
    for sample_id in sample_ids:
        sample = samples.get(sample_id)
        if sample is None:
            continue
        if isinstance(task, Perplexity):
            ids = lm.encode(sample.text, raw=True)[: task.prefill + task.window]
            prompt_len = task.prefill
        elif isinstance(task, GenerationTask):
            answer = dense_records.get(sample.id, {}).get("token_ids")
            if not answer:
                continue
            chat = lm.has_chat_template
            prompt = lm.encode(task.prompt(sample, chat), raw=not chat)
            ids, prompt_len = prompt + list(answer), len(prompt)
        else:
            continue
        if len(ids) > prompt_len:
            segments[sample.id] = Segment(f"{task_name}/{sample.id}", ids, prompt_len)
    return segments


def kernel_of(lm: RiverLM, method: str) -> str | None:
    """The backend(s) of the quantized layers a method runs, or None when it runs none. `method`
    is a name as the runner writes it, which spells out any width but 4 ("river3:0.9", "w3")."""
    from riverllm.policy import Method
    from riverllm.river.quant import QuantLinear

    parsed = Method.parse(method)
    if not parsed.needs_river:
        return None
    backends = {m.backend for m in lm.river(parsed.bits).modules() if isinstance(m, QuantLinear)}
    return "+".join(sorted(backends))


class FidelityColumns:
    """Computes all three columns in one go for a context (the providers below share it)."""

    def __init__(self) -> None:
        self._context: MetricContext | None = None
        self._values: dict[str, dict[RowKey, float | str | None]] = {}

    def values(self, context: MetricContext, column: str) -> dict[RowKey, float | str | None]:
        if self._context is not context:
            self._context, self._values = context, self._compute(context)
        return self._values.get(column, {})

    def _compute(self, context: MetricContext) -> dict[str, dict[RowKey, float | str | None]]:
        from tqdm.auto import tqdm

        root = context.out_dir / "fidelity"
        lm = context.lm
        columns: dict[str, dict[RowKey, float | str | None]] = {"agree": {}, "kl": {}, "kernel": {}}
        kernels_path = root / "kernels.json"
        kernels = json.loads(kernels_path.read_text()) if kernels_path.exists() else {}
        if lm is not None:
            for method in context.methods:
                kernels[method] = kernel_of(lm, method)
            root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(kernels_path, json.dumps(kernels, indent=2) + "\n")
        for key in context.records:
            columns["kernel"][key] = kernels.get(key[1])

        # What is left to measure, first, so that one progress bar covers it all.
        plan = []
        segments_by_task: dict[str, dict[str, Segment]] = {}
        for (task_name, method), records in context.records.items():
            if task_name not in segments_by_task:
                dense_records = {r["id"]: r for r in context.records.get((task_name, "dense"), [])}
                sample_ids = dict.fromkeys(r["id"] for (task, _), rs in context.records.items()
                                           if task == task_name for r in rs)
                segments_by_task[task_name] = {} if lm is None else task_segments(
                    lm, context.tasks[task_name], task_name, sample_ids, dense_records)
            cache_path = root / records_path(Path(), task_name, method)
            cached, segments = load_records(cache_path), segments_by_task[task_name]
            stale = [(r["id"], segments[r["id"]]) for r in records if r["id"] in segments
                     and cached.get(r["id"], {}).get("fingerprint") != segments[r["id"]].fingerprint]
            plan.append((task_name, method, records, cached, cache_path, stale))
        todo = sum(segment.positions for *_, stale in plan for _, segment in stale)
        references = References(lm, root / "reference") if lm is not None else None
        bar = tqdm(total=todo, desc="fidelity vs dense", unit="tok", disable=None if todo else True, leave=False)
        for task_name, method, records, cached, cache_path, stale in plan:
            # Measure what is not cached, the run's batch size at a time (per-row exits: each
            # segment's numbers are those it gets alone), appending each batch as it finishes.
            for start in range(0, len(stale), context.batch_size):
                chunk = stale[start:start + context.batch_size]
                measured = measure(lm, [segment for _, segment in chunk], method, references, batch_size=len(chunk))
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                for (sample_id, segment), (positions, agreeing, kl_sum) in zip(chunk, measured.segments):
                    cached[sample_id] = {"id": sample_id, "fingerprint": segment.fingerprint, "positions": positions,
                                         "agreeing": agreeing, "kl_sum": kl_sum}
                    append_record(cache_path, cached[sample_id])
                bar.update(sum(segment.positions for _, segment in chunk))
            total = Fidelity()
            missing = False  # a sample with no measurement that only the model could make
            for record in records:
                entry = cached.get(record["id"])
                if entry is None:  # with the model loaded this means dense gave no answer to score
                    missing = missing or lm is None
                    continue
                total.positions += entry["positions"]
                total.agreeing += entry["agreeing"]
                total.kl_sum += entry["kl_sum"]
            known = not missing and total.positions > 0
            columns["agree"][(task_name, method)] = 100.0 * total.agree if known else None
            columns["kl"][(task_name, method)] = total.kl if known else None
        bar.close()
        return columns


_COLUMNS = FidelityColumns()

register_metric(MetricProvider(
    "agree", "agree %", lambda context: _COLUMNS.values(context, "agree"), digits=1,
    description="teacher-forced on dense's text (ppl: the Brown windows; generation tasks: the prompt and "
                "dense's answer), the share of positions whose greedy next token equals dense's"))
register_metric(MetricProvider(
    "kl", "KL", lambda context: _COLUMNS.values(context, "kl"), higher_is_better=False, digits=4,
    description="on the same positions, the mean KL(dense || method) of the next-token distributions, in nats"))
register_metric(MetricProvider(
    "kernel", "kernel", lambda context: _COLUMNS.values(context, "kernel"), panel=False, digits=0,
    description="what ran the method's quantized layers: int4_cuda / int4_cpu (torch's int4 kernels) or "
                "dequant (HQQ dequantizes on the fly; no low-bit kernel here for that width); - when it has none"))
