"""Extra per-method metrics: the hook through which other modules add columns to the report.

After the sweep, the runner computes the standard row of every (task, method) pair (score,
tokens/s, speedup, layers per token, share of tokens that exited), then asks every registered
`MetricProvider` for its values. Each provider adds one column to `summary.json` (a key in every
row, and an entry in "columns") and to the table in `report.md`; with `panel=True` it also adds
a row of panels to `pareto.png` (its value against speedup, one curve per method family).

To add a metric, write a function `compute(context) -> {(task, method): value or None}` and
register it when your module is imported:

    from riverllm.eval.metrics import MetricProvider, register_metric

    def agreement(context):
        ...  # context.records[(task, method)]: that pair's JSONL records; context.lm: the model
        return {(task, method): 97.5, ...}

    register_metric(MetricProvider("agree", "agree %", agreement,
                                   description="share of tokens where the greedy choice equals dense's"))

and add the module's import name to `METRIC_MODULES` below (the runner imports those before it
summarizes; a module that is not installed is skipped). A provider that needs the model (e.g. a
KL divergence against dense, computed with `lm.teacher_forced`) finds it in `context.lm`; it is
None when a report is rebuilt from the files alone, and the provider should then return {} or
values it cached under `context.out_dir`. Values are plain floats (JSON), None where the metric
does not apply (or short strings, for a column that is a label, with panel=False). Providers run
in registration order; a provider registered again under the same name replaces the old one.
`riverllm eval --metrics match,agree` computes only the named columns (`none`: none of them).

`match` lives here: the share (%) of a task's samples whose whole greedy output (token ids) is
identical to dense's, over the samples both have. It needs only the JSONL records.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from riverllm.api import RiverLM
    from riverllm.eval.tasks import Task

RowKey = tuple[str, str]  # (task name, method name)


@dataclass
class MetricContext:
    """What a provider can read."""

    records: dict[RowKey, list[dict]]  # per (task, method): the records of this run's samples, in order
    tasks: dict[str, Task]  # task name -> task (its metric, whether it generates)
    methods: list[str]  # method names, in the order of the sweep
    rows: dict[RowKey, dict[str, Any]]  # the standard summary rows (and earlier providers' columns)
    out_dir: Path  # the run's output directory (a provider may cache its own files here)
    lm: RiverLM | None = None  # the model, when the run has it loaded
    settings: dict[str, Any] = field(default_factory=dict)  # run.json: model, bits, group size, task settings
    batch_size: int = 1  # samples a provider may run through the model together (the run's --batch-size)


@dataclass(frozen=True)
class MetricProvider:
    name: str  # the key in summary.json rows, e.g. "match"
    label: str  # the column header in report.md, e.g. "match %"
    compute: Callable[[MetricContext], dict[RowKey, float | str | None]]
    higher_is_better: bool = True
    panel: bool = True  # add "value vs speedup" panels to pareto.png
    digits: int = 1  # decimals shown in report.md
    description: str = ""  # one sentence for the report's legend


METRIC_PROVIDERS: list[MetricProvider] = []
# Modules that register providers when imported (issue 6 adds its fidelity module here).
METRIC_MODULES: list[str] = ["riverllm.eval.fidelity"]  # issue 6: agree, kl, kernel (eval/fidelity.py)


def register_metric(provider: MetricProvider) -> None:
    METRIC_PROVIDERS[:] = [p for p in METRIC_PROVIDERS if p.name != provider.name] + [provider]


def load_metric_providers() -> list[MetricProvider]:
    """The registered providers, after importing every module in METRIC_MODULES."""
    for module in METRIC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the module exists but something it imports is missing
                raise
    return list(METRIC_PROVIDERS)


def match_rates(context: MetricContext) -> dict[RowKey, float | None]:
    """Percent of samples whose generated token ids equal dense's (None for teacher-forced tasks
    and where dense was not run)."""
    rates: dict[RowKey, float | None] = {}
    for (task, method), records in context.records.items():
        dense = {r["id"]: r.get("token_ids") for r in context.records.get((task, "dense"), [])}
        pairs = [(r.get("token_ids"), dense[r["id"]]) for r in records if r["id"] in dense]
        pairs = [(mine, theirs) for mine, theirs in pairs if mine is not None and theirs is not None]
        rates[(task, method)] = 100.0 * sum(mine == theirs for mine, theirs in pairs) / len(pairs) if pairs else None
    return rates


register_metric(MetricProvider(
    "match", "match %", match_rates,
    description="share of samples whose whole greedy output (token ids) equals dense's"))
