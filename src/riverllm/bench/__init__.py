"""`riverllm bench`: a side-by-side decoding-speed benchmark (see run.py for the method).

shapes.py: model shapes (public configs, random weights) and exit-depth profiles;
measure.py: timing, bandwidth, weight bytes per token, the exit-replaying policy;
run.py: the methods and the run; report.py: bench.json, bench.md, bench.png.
"""

from riverllm.bench.report import write_outputs
from riverllm.bench.run import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench", "write_outputs"]
