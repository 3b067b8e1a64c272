"""Server counters, rendered in the Prometheus text format for `GET /metrics`.

Written by two threads (the asyncio side counts requests, the model worker counts tokens, steps
and the batch), so every update takes one lock. The format is a handful of lines (`# HELP`,
`# TYPE`, `name value`), simple enough that no client library is needed.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field


def resident_memory_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere): the load test checks it stays flat."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Metrics:
    num_layers: int
    requests: Counter = field(default_factory=Counter)  # (endpoint, status code) -> count
    cancelled: int = 0  # generations stopped because the client went away
    finished: int = 0  # generations that left the batch, cancelled or not
    prompt_tokens: int = 0
    generated_tokens: int = 0
    exit_layer_sum: int = 0  # over generated tokens: backbone layers each one ran
    exit_layers: Counter = field(default_factory=Counter)  # backbone layers run -> generated tokens
    busy_seconds: float = 0.0  # wall time the worker spent in prefills and decoding steps
    steps: int = 0  # prefills + decoding steps
    decode_steps: int = 0
    decode_rows: int = 0  # rows over all decoding steps (mean batch size = decode_rows / decode_steps)
    queue_length: int = 0  # set by the worker: requests waiting for a row
    running: int = 0  # requests in the running batch
    kv_used_tokens: int = 0  # KV-cache slots reserved by the running requests
    kv_capacity_tokens: int = 0
    max_batch_size: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_token(self, exit_layer: int) -> None:
        with self._lock:
            self.generated_tokens += 1
            self.exit_layer_sum += exit_layer
            self.exit_layers[exit_layer] += 1

    def count_busy(self, seconds: float, decode_rows: int = 0) -> None:
        """One prefill (decode_rows=0) or one decoding step over `decode_rows` rows took `seconds`."""
        with self._lock:
            self.busy_seconds += seconds
            self.steps += 1
            if decode_rows:
                self.decode_steps += 1
                self.decode_rows += decode_rows

    def count_generation(self, prompt_tokens: int, cancelled: bool) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cancelled += int(cancelled)
            self.finished += 1

    def set_queue(self, waiting: int, running: int, kv_used_tokens: int = 0) -> None:
        with self._lock:
            self.queue_length, self.running, self.kv_used_tokens = waiting, running, kv_used_tokens

    def mean_request_seconds(self) -> float | None:
        """Busy time per finished request since start: how long a batch slot stays taken."""
        with self._lock:
            return self.busy_seconds * self.max_batch_size / self.finished if self.finished else None

    def render(self) -> str:
        with self._lock:
            tokens_per_s = self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0
            mean_exit = self.exit_layer_sum / self.generated_tokens if self.generated_tokens else 0.0
            mean_batch = self.decode_rows / self.decode_steps if self.decode_steps else 0.0
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP riverllm_{name} {help_text}", f"# TYPE riverllm_{name} {kind}"])
                # Integer counters print exactly; %g would round them to 6 digits past a million.
                lines.extend(f"riverllm_{name}{labels} {value if isinstance(value, int) else f'{value:g}'}"
                             for labels, value in samples)

            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{endpoint}",status="{status}"}}', count)
                    for (endpoint, status), count in sorted(self.requests.items())])
            metric("cancelled_total", "counter", "Generations stopped early because the client disconnected.",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("generation_seconds_total", "counter",
                   "Wall seconds the model worker spent in prefills and decoding steps.", [("", self.busy_seconds)])
            metric("tokens_per_second", "gauge",
                   "Generated tokens per second of the worker's busy time, since start (all rows together).",
                   [("", tokens_per_s)])
            metric("mean_exit_layer", "gauge", "Mean number of backbone layers run per generated token.",
                   [("", mean_exit)])
            metric("exit_layer_tokens_total", "counter", "Generated tokens by the number of backbone layers they ran.",
                   [(f'{{layer="{layer}"}}', count) for layer, count in sorted(self.exit_layers.items())])
            metric("num_layers", "gauge", "Decoder layers of the served model.", [("", self.num_layers)])
            metric("queue_length", "gauge", "Requests waiting for a row of the running batch.",
                   [("", self.queue_length)])
            metric("running", "gauge", "Requests in the running batch (its batch size now).", [("", self.running)])
            metric("batch_size", "gauge", "Requests in the running batch now (same as running).",
                   [("", self.running)])
            metric("max_batch_size", "gauge", "Rows the running batch may hold (--max-batch-size).",
                   [("", self.max_batch_size)])
            metric("mean_batch_size", "gauge", "Rows per decoding step, since start.", [("", mean_batch)])
            metric("steps_total", "counter", "Worker steps: prefills and decoding steps.", [("", self.steps)])
            metric("decode_steps_total", "counter", "Decoding steps (all running rows, one token each).",
                   [("", self.decode_steps)])
            metric("decode_rows_total", "counter", "Rows over all decoding steps (rows per step over an interval: "
                   "its increase over decode_steps_total's).", [("", self.decode_rows)])
            metric("kv_cache_used_tokens", "gauge", "KV-cache slots reserved by the running requests.",
                   [("", self.kv_used_tokens)])
            metric("kv_cache_capacity_tokens", "gauge", "KV-cache slots in the pool (--kv-cache-tokens).",
                   [("", self.kv_capacity_tokens)])
        metric("resident_memory_bytes", "gauge", "Resident memory of the server process.",
               [("", resident_memory_bytes())])
        return "\n".join(lines) + "\n"
