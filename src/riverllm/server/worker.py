"""The model's one worker thread: it runs generation requests one at a time, in arrival order.

Generation is not thread-safe (one model, one set of rivers, one torch RNG), and a batch would
change River-LLM's exit decisions (the batch exits at its least settled token), so every request
goes through one FIFO queue to one thread, and its answer is the same as `lm.generate` gives.

The asyncio side submits a `Job` and reads the job's `events` (an asyncio.Queue the worker fills
with `loop.call_soon_threadsafe`): `StreamEvent`s as tokens come, the last one carrying the
result, or an exception. `job.cancel()` may be called at any time: a waiting job is skipped,
a running one stops at its next token (the generator is closed) and the worker moves on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from riverllm.api import Prompt, RiverLM, StreamEvent
from riverllm.errors import RiverError
from riverllm.server.metrics import Metrics

logger = logging.getLogger("riverllm.server")


@dataclass
class Job:
    prompt: Prompt
    options: dict  # keyword arguments of lm.stream
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


class ModelWorker:
    def __init__(self, lm: RiverLM, metrics: Metrics):
        self.lm, self.metrics = lm, metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="riverllm-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job, drop the waiting ones, and end the thread."""
        if self._current is not None:
            self._current.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)
        self._publish_queue()

    def _publish_queue(self) -> None:
        self.metrics.set_queue(self._jobs.qsize(), int(self._current is not None))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():  # the client left while waiting
                self.metrics.count_generation(0, 0.0, cancelled=True)
                self._publish_queue()
                continue
            self._current = job
            self._publish_queue()
            try:
                self._generate(job)
            finally:
                self._current = None
                self._publish_queue()

    def _generate(self, job: Job) -> None:
        start = time.perf_counter()
        stream = self.lm.stream(job.prompt, **job.options)
        cancelled = False
        try:
            for event in stream:
                if job.cancelled.is_set():
                    cancelled = True
                    break
                if event.exit_layer is not None:
                    self.metrics.count_token(event.exit_layer)
                job.deliver(event)
        except Exception as error:  # RiverError (a user mistake) or a bug: the request fails, the worker lives
            if not isinstance(error, RiverError):
                logger.exception("generation failed")
            job.deliver(error)
        finally:
            stream.close()  # frees the KV cache now, not at garbage collection
            self.metrics.count_generation(job.prompt_tokens, time.perf_counter() - start, cancelled)

