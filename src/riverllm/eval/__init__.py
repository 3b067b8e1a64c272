"""`riverllm eval`: accuracy and speed of River-LLM against every baseline, on real tasks.

    tasks.py    data, prompts and scoring of humaneval, gsm8k, asdiv and ppl
    answers.py  the final number of a chain-of-thought reply
    sandbox.py  running model-written code in a fenced-in process
    runner.py   the resumable sweep over tasks x methods (EvalConfig, run_eval)
    report.py   summary.json, report.md, pareto.png, exits.png
    metrics.py  the hook for extra per-method metrics (MetricProvider), and `match`

See docs/eval.md.
"""

from riverllm.eval.metrics import MetricContext, MetricProvider, register_metric
from riverllm.eval.runner import EvalConfig, run_eval

__all__ = ["EvalConfig", "MetricContext", "MetricProvider", "register_metric", "run_eval"]
