"""The model's one worker thread: continuous batching with per-row exits.

Requests wait in one FIFO queue. Between two decoding steps the worker admits waiting requests
while the running batch has a free row (`max_batch_size`) and the KV pool has blocks for the
request's prompt + max_tokens (kvpool.py): it prefills each one into its row and sends its first
token. Then every running row decodes one token. A row leaves the batch the moment its request
finishes (EOS, stop string, max_tokens) or its client goes away, and its row and blocks are free
for the next request at the following step.

Why answers do not change: River-LLM exits per row (docs/engine.md), each prompt is prefilled
alone, and each request keeps its own sampler (own torch.Generator), stop strings, max_tokens,
method and tau, so a request's tokens and exit layers are those it gets alone, as `lm.generate`
gives them. Rows whose method, tau or bit width differ cannot share one forward call (one
ExitPolicy and one river per call): the batch runs one forward per (policy, river) group per step,
over the same KV pool. Prior KV strategies (recompute, mask, ...) decide per batch and need a
cache that tracks holes, so each of those requests runs as a group of its own with a private
cache. The exactness is single-threaded: the worker sets torch's intra-op threads (`threads`,
1 by default on CPU) because with several threads the BLAS splits the LM head differently for
different batch sizes (docs/engine.md).

`max_batch_size=1` is the previous server: one request at a time, in arrival order.

The asyncio side submits a `Job` and reads the job's `events` (an asyncio.Queue the worker fills
with `loop.call_soon_threadsafe`): `StreamEvent`s as tokens come, the last one carrying the
result, or an exception. `job.cancel()` may be called at any time: a waiting job is dropped, a
running one leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from riverllm.api import DEFAULT_DRAFT_HEAD_BITS, Prompt, RiverLM, StreamEvent
from riverllm.engine import GenerationResult
from riverllm.engine.cache import KVCache
from riverllm.engine.generate import Sampler, SamplingConfig, StepEvent
from riverllm.engine.lossless import DraftConfig, LosslessDecoder
from riverllm.errors import RiverError
from riverllm.policy import ExitPolicy, Method
from riverllm.server.kvpool import PagedKVCache
from riverllm.server.metrics import Metrics
from riverllm.server.schemas import APIError
from riverllm.textstream import TextStream

logger = logging.getLogger("riverllm.server")


@dataclass
class Job:
    prompt: Prompt
    options: dict  # keyword arguments of lm.stream: method (a Method), max_new_tokens, sampling, stop, raw ...
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamEvent | Exception
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def deliver(self, item: StreamEvent | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancel()


@dataclass
class BatchSettings:
    max_batch_size: int = 16  # rows decoding together; 1: one request at a time (FIFO)
    kv_cache_tokens: int | None = None  # KV pool size in token slots (None: see ModelWorker)
    threads: int | None = None  # torch intra-op threads of the worker (None: 1 on CPU, torch's default elsewhere)


class Row:
    """One running request: where it sits in the cache, how it samples, and what it has made."""

    def __init__(self, job: Job, lm: RiverLM, prompt_ids: list[int], policy: ExitPolicy, river: nn.ModuleList | None,
                 method: Method, cache: KVCache, cache_row: int, eos: tuple[int, ...]):
        options = job.options
        self.job, self.lm, self.prompt_ids = job, lm, prompt_ids
        self.policy, self.river, self.method = policy, river, method
        self.cache, self.cache_row = cache, cache_row
        self.budget = min(options["max_new_tokens"], lm.context_length - len(prompt_ids))  # as lm.stream
        self.sampler = Sampler(SamplingConfig(options["temperature"], options["top_p"], options["top_k"],
                                              options["seed"]), lm.engine.device)
        self.eos = set(eos)
        self.text = TextStream(lm.tokenizer, options.get("stop") or ())
        self.reserved = 0  # KV slots held for this request
        self.ids: list[int] = []
        self.exit_layers: list[int] = []
        self.times: list[float] = []
        self.done = False

        self.decoder: LosslessDecoder | None = None  # the lossless method's draft-verify cycles
        if method.kind == "lossless":
            drafting = DraftConfig(lm.default_draft_tokens(method.bits), lookup_tokens=lm.default_draft_lookup())
            head = lm.low_bit_head(DEFAULT_DRAFT_HEAD_BITS)
            self.decoder = LosslessDecoder(lm.engine, [prompt_ids], policy, river, self.budget,
                                           self.sampler.sampling, eos, drafting=drafting, draft_head=head,
                                           cache=cache, cache_rows=[cache_row])

    @property
    def group(self) -> tuple:
        """Rows with the same group run in one forward call (a lossless row runs its own cycles)."""
        if self.decoder is not None:
            return ("lossless", id(self))
        return id(self.cache), self.policy, id(self.river)

    def accept(self, logits: torch.Tensor, exit_layer: int, seconds: float) -> None:
        """Sample this row's next token from its logits [vocab] and send it to the client."""
        self.take(int(self.sampler(logits)), exit_layer, seconds)

    def take_events(self, events: list[StepEvent]) -> list[int]:
        """A lossless start or cycle's tokens, up to the row's end; returns their exit layers."""
        taken = []
        for event in events:
            if self.done:
                break
            if event.present is None or event.present[0]:
                self.take(event.tokens[0], event.exit_layers[0], event.row_seconds[0] if event.row_seconds
                          else event.seconds)
                taken.append(event.exit_layers[0])
        return taken

    def take(self, token: int, exit_layer: int, seconds: float) -> None:
        """Record this row's next token and send it to the client."""
        self.ids.append(token)
        self.exit_layers.append(exit_layer)
        self.times.append(seconds)
        delta = self.text.push(token)
        hit_eos = token in self.eos
        result = None
        if hit_eos or self.text.stopped or len(self.ids) >= self.budget:
            self.done = True
            delta += self.text.finish()
            result = GenerationResult(
                text=self.text.text, token_ids=self.ids, exit_layers=self.exit_layers, token_times=self.times,
                finish_reason="stop" if (hit_eos or self.text.stopped) else "length",
                prompt_tokens=len(self.prompt_ids), num_layers=self.lm.num_layers, method=self.method.name,
                extra={"drafting": self.decoder.stats[0].to_dict()} if self.decoder is not None else {})
        self.job.deliver(StreamEvent(delta, token, exit_layer, result))


class ModelWorker:
    def __init__(self, lm: RiverLM, metrics: Metrics, settings: BatchSettings | None = None):
        self.lm, self.metrics = lm, metrics
        self.settings = settings = settings or BatchSettings()
        if settings.max_batch_size < 1:
            raise RiverError(f"--max-batch-size must be at least 1, got {settings.max_batch_size}")
        # The pool holds at least one whole context (any valid request fits) and by default 1024
        # tokens per row of a full batch; blocks are committed to memory only once used.
        capacity = settings.kv_cache_tokens or max(lm.context_length, 1024 * settings.max_batch_size)
        if capacity < 1:
            raise RiverError(f"--kv-cache-tokens must be at least 1, got {capacity}")
        self.pool = PagedKVCache(lm.engine, settings.max_batch_size, lm.context_length, capacity)
        self.metrics.kv_capacity_tokens = self.pool.capacity_tokens
        self.metrics.max_batch_size = settings.max_batch_size
        self._waiting: deque[Job] = deque()
        self._rows: list[Row] = []
        self._private_tokens = 0  # KV slots held by private (prior-strategy) caches, counted against the pool
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="riverllm-model-worker", daemon=True)

    # --- the asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running jobs, drop the waiting ones, and end the thread."""
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancel()
            self._waiting.clear()
            for row in self._rows:
                row.job.cancel()
            self._lock.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job. A request whose prompt + max_tokens cannot fit the KV pool even when it is
        empty is refused here (a 400), before it waits."""
        need = job.prompt_tokens + job.options["max_new_tokens"]
        if need > self.pool.capacity_tokens:
            raise APIError(400, f"the request needs {need} KV-cache slots ({job.prompt_tokens} prompt tokens + "
                                f"max_tokens {job.options['max_new_tokens']}) but this server's KV cache holds "
                                f"{self.pool.capacity_tokens} (--kv-cache-tokens): lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        with self._lock:
            self._waiting.append(job)
            self._lock.notify()
        self._publish()

    def retry_after_s(self) -> int:
        """A client refused with 429 may retry after about the time the queue ahead takes to drain."""
        per_request = self.metrics.mean_request_seconds() or 1.0
        drain = per_request * (len(self._waiting) + 1) / self.settings.max_batch_size
        return int(min(60, max(1, round(drain))))

    def _publish(self) -> None:
        self.metrics.set_queue(len(self._waiting), len(self._rows), self.pool.used_tokens + self._private_tokens)

    # --- the worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        threads = self.settings.threads
        if threads is None and self.lm.engine.device.type == "cpu":
            threads = 1  # batch-invariant answers (module docstring); also the fastest on a shared CPU
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                while self._next_round():
                    self._admit()
                    if self._rows:
                        self._step()
        finally:
            for row in list(self._rows):
                self._finish(row, cancelled=True)
            if threads is not None:
                torch.set_num_threads(previous)

    def _next_round(self) -> bool:
        """Wait until there is work; drop rows and jobs whose clients left. False: stop."""
        with self._lock:
            while not self._stopping and not self._waiting and not self._rows:
                self._lock.wait()
            if self._stopping:
                return False
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(job)
                self.metrics.count_generation(0, cancelled=True)
        for row in [r for r in self._rows if r.job.cancelled.is_set()]:
            self._finish(row, cancelled=True)
        self._publish()
        return True

    def _admit(self) -> None:
        """Move waiting jobs into free rows, in arrival order, while rows and KV blocks allow; a job
        that does not fit yet stops admission (no overtaking: the queue stays fair)."""
        while len(self._rows) < self.settings.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting[0]
                need = job.prompt_tokens + job.options["max_new_tokens"]
                if not self.pool.can_reserve(need) or self._private_tokens + self.pool.used_tokens + need > \
                        self.pool.capacity_tokens:
                    return
                self._waiting.popleft()
            self._start(job)
            self._publish()

    def _start(self, job: Job) -> None:
        """Prefill a job into a free row and send its first token."""
        lm, options = self.lm, job.options
        start = time.perf_counter()
        try:
            method, policy, river = lm._policy(options["method"], None, None, 1, None)
            prompt_ids = lm.encode(job.prompt, options.get("raw", False))
            eos = () if options.get("ignore_eos") else lm.eos_token_ids()
            reserved = min(len(prompt_ids) + options["max_new_tokens"], lm.context_length)
            if policy.kv_strategy == "river":
                cache, cache_row = self.pool, self.pool.free_rows()[0]
                self.pool.reserve(cache_row, reserved)
            else:  # prior strategies decide per batch and track holes: a cache of their own
                cache, cache_row = lm.engine.new_cache(1, reserved, track_filled=True), 0
                cache.prompt_lengths = [len(prompt_ids)]
                self._private_tokens += reserved
            row = Row(job, lm, prompt_ids, policy, river, method, cache, cache_row, eos)
            row.reserved = reserved
        except Exception as error:  # RiverError (a user mistake) or a bug: the request fails, the worker lives
            if not isinstance(error, RiverError):
                logger.exception("admitting a request failed")
            job.deliver(error)
            self.metrics.count_generation(job.prompt_tokens, cancelled=False)
            return
        self._rows.append(row)
        try:
            if row.decoder is not None:
                self._take(row, row.decoder.start())
            else:
                output = lm.engine.prefill([prompt_ids], cache, policy, river, rows=[cache_row])
                self._accept(row, output.logits[0], output.exit_layers[0], time.perf_counter() - start)
        except Exception as error:
            self._fail([row], error)
        self.metrics.count_busy(time.perf_counter() - start)

    def _step(self) -> None:
        """One decoding step for every running row: one forward per (cache, policy, river) group."""
        groups: dict[tuple, list[Row]] = {}
        for row in self._rows:
            groups.setdefault(row.group, []).append(row)
        start, ran = time.perf_counter(), len(self._rows)
        for rows in groups.values():
            group_start = time.perf_counter()
            try:
                first = rows[0]
                if first.decoder is not None:  # lossless: one draft-verify cycle
                    self._take(first, first.decoder.cycle())
                    continue
                input_ids = torch.tensor([[row.ids[-1]] for row in rows], device=self.lm.engine.device)
                output = self.lm.engine.forward(input_ids, first.cache, first.policy, first.river,
                                                rows=[row.cache_row for row in rows])
                seconds = time.perf_counter() - group_start
                for i, row in enumerate(rows):
                    self._accept(row, output.logits[i], output.exit_layers[i], seconds)
            except Exception as error:
                self._fail(rows, error)
        self.metrics.count_busy(time.perf_counter() - start, decode_rows=ran)

    def _accept(self, row: Row, logits: torch.Tensor, exit_layer: int, seconds: float) -> None:
        row.accept(logits, exit_layer, seconds)
        self.metrics.count_token(exit_layer)
        if row.done:
            self._finish(row, cancelled=False)

    def _take(self, row: Row, events: list[StepEvent]) -> None:
        for exit_layer in row.take_events(events):
            self.metrics.count_token(exit_layer)
        if row.done:
            self._finish(row, cancelled=False)

    def _fail(self, rows: list[Row], error: Exception) -> None:
        if not isinstance(error, RiverError):
            logger.exception("generation failed")
        for row in rows:
            if row in self._rows:
                row.job.deliver(error)
                self._finish(row, cancelled=False)

    def _finish(self, row: Row, cancelled: bool) -> None:
        """The row leaves the batch; its cache row and blocks are free at once."""
        if row not in self._rows:
            return
        self._rows.remove(row)
        if row.cache is self.pool:
            self.pool.release(row.cache_row)
        else:
            self._private_tokens -= row.reserved
        self.metrics.count_generation(len(row.prompt_ids), cancelled=cancelled)
        self._publish()
