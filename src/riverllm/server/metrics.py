"""Server counters, rendered in the Prometheus text format for `GET /metrics`.

Written by two threads (the asyncio side counts requests, the model worker counts tokens), so
every update takes one lock. The format is a handful of lines (`# HELP`, `# TYPE`, `name value`),
simple enough that no client library is needed.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    num_layers: int
    requests: Counter = field(default_factory=Counter)  # (endpoint, status code) -> count
    cancelled: int = 0  # generations stopped because the client went away
    prompt_tokens: int = 0
    generated_tokens: int = 0
    exit_layer_sum: int = 0  # over generated tokens: backbone layers each one ran
    busy_seconds: float = 0.0  # time the worker spent generating
    queue_length: int = 0  # set by the worker: requests waiting for it
    running: int = 0  # 0 or 1: a generation is in progress
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_token(self, exit_layer: int) -> None:
        with self._lock:
            self.generated_tokens += 1
            self.exit_layer_sum += exit_layer

    def count_generation(self, prompt_tokens: int, seconds: float, cancelled: bool) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.busy_seconds += seconds
            self.cancelled += int(cancelled)

    def set_queue(self, waiting: int, running: int) -> None:
        with self._lock:
            self.queue_length, self.running = waiting, running

    def render(self) -> str:
        with self._lock:
            tokens_per_s = self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0
            mean_exit = self.exit_layer_sum / self.generated_tokens if self.generated_tokens else 0.0
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP riverllm_{name} {help_text}", f"# TYPE riverllm_{name} {kind}"])
                lines.extend(f"riverllm_{name}{labels} {value:g}" for labels, value in samples)

            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{endpoint}",status="{status}"}}', count)
                    for (endpoint, status), count in sorted(self.requests.items())])
            metric("cancelled_total", "counter", "Generations stopped early because the client disconnected.",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("generation_seconds_total", "counter", "Seconds the model worker spent generating.",
                   [("", self.busy_seconds)])
            metric("tokens_per_second", "gauge", "Generated tokens per second of generation time, since start.",
                   [("", tokens_per_s)])
            metric("mean_exit_layer", "gauge", "Mean number of backbone layers run per generated token.",
                   [("", mean_exit)])
            metric("num_layers", "gauge", "Decoder layers of the served model.", [("", self.num_layers)])
            metric("queue_length", "gauge", "Requests waiting for the model.", [("", self.queue_length)])
            metric("running", "gauge", "Generations in progress (0 or 1).", [("", self.running)])
        return "\n".join(lines) + "\n"
