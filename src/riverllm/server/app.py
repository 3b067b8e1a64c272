"""The OpenAI-compatible HTTP server: FastAPI routes in front of one model worker.

    GET  /v1/models             the served model (its id is `lm.name`)
    POST /v1/completions        raw-text completion; `stream: true` answers server-sent events
    POST /v1/chat/completions   chat (the model's chat template); streams likewise
    GET  /health                200 while the model worker is alive
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, mean exit layer, queue

Limits against hostile clients (docs/security.md): a body-size limit (413, checked on
Content-Length before the body is read, and while it streams in), tokenization off the event loop
with a prompt-token limit (400), uvicorn's keep-alive timeout, connection limit and h11 header
size limit (`uvicorn_config`), sampling values that cannot overflow, the API key compared as bytes,
/docs and /openapi.json off when a key is set, and every answer (500s too) counted in /metrics.

A request is validated completely here (model name, fields, method and tau, prompt length
against the context window) before it is queued, so a bad request is answered at once with an
OpenAI-style 4xx body and never waits behind others. Every answer carries River-LLM's exit
statistics in an extra `river` field (in streams: on the chunk with the finish_reason).

A client that disconnects frees its place: the request waiting for the worker is skipped, or
the running generation stops at its next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from riverllm.api import Prompt, RiverLM, StreamEvent, check_generation_options
from riverllm.engine import GenerationResult
from riverllm.errors import RiverError
from riverllm.policy import Method
from riverllm.server.metrics import Metrics
from riverllm.server.schemas import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest
from riverllm.server.worker import BatchSettings, Job, ModelWorker

logger = logging.getLogger("riverllm.server")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    method: str = "river"  # default decoding method for requests that name none
    tau: float | None = None  # default tau for river methods (None: the model's default)
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_queue: int = 256  # requests allowed to wait; more get a 429
    max_batch_size: int = 16  # requests decoding together (continuous batching); 1: one at a time
    kv_cache_tokens: int | None = None  # KV pool in token slots (None: max(context, 1024 x max_batch_size))
    threads: int | None = None  # torch threads of the model worker (None: 1 on CPU, for batch-invariant answers)
    max_body_bytes: int = 1 << 20  # larger request bodies get a 413
    max_prompt_tokens: int | None = None  # longer prompts get a 400 (None: the model's context length)
    max_connections: int = 512  # open connections + running requests; beyond it uvicorn answers 503
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    def check(self) -> None:
        """Raise RiverError for settings that cannot work, before the model is loaded."""
        check_generation_options(self.method, self.tau)
        if not 0 < self.port < 65536:
            raise RiverError(f"--port must be in 1..65535, got {self.port}")
        if self.max_queue < 1:
            raise RiverError(f"--max-queue must be at least 1, got {self.max_queue}")
        for flag, value in (("--max-batch-size", self.max_batch_size), ("--kv-cache-tokens", self.kv_cache_tokens),
                            ("--threads", self.threads)):
            if value is not None and value < 1:
                raise RiverError(f"{flag} must be at least 1, got {value}")
        if self.max_body_bytes < 1024 or (self.max_prompt_tokens is not None and self.max_prompt_tokens < 1):
            raise RiverError("the body limit must be at least 1024 bytes and the prompt-token limit at least 1")
        if self.max_connections < 1 or not self.keep_alive_s > 0:
            raise RiverError("--max-connections must be at least 1 and --keep-alive above 0 seconds")
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as error:
                raise RiverError(f"cannot listen on {self.host}:{self.port} ({error.strerror}): "
                                 "pick another --port or --host") from None


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


# --- requests to worker jobs ---------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated request, ready for the worker."""

    prompt: Prompt
    options: dict  # keyword arguments of lm.stream
    prompt_tokens: int
    tau: float | None  # the exit threshold in effect (None for dense / w4), reported back
    stops: list[str]


class Preparer:
    def __init__(self, lm: RiverLM, settings: ServerSettings):
        self.lm, self.settings = lm, settings
        # The worker thread decodes with lm.tokenizer while requests are counted here, on the
        # event loop; a HuggingFace fast tokenizer must not be used by two threads at once, so
        # the counting side gets its own copy (a shallow copy of lm shares everything else).
        self.counter = copy.copy(lm)
        self.counter.tokenizer = copy.deepcopy(lm.tokenizer)

    def __call__(self, body: GenerationRequest, prompt: Prompt, raw: bool, prompt_param: str) -> Prepared:
        if body.model != self.lm.name:
            raise APIError(404, f"The model '{body.model}' does not exist: this server serves '{self.lm.name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        refusal = body.refusals()
        if refusal is not None:
            raise refusal
        method, tau = self._method(body)
        if isinstance(prompt, str) and not prompt.strip():
            raise APIError(400, f"{prompt_param} is empty: send some text", param=prompt_param)
        try:
            check_generation_options(method, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                     seed=body.seed)
        except RiverError as error:
            raise APIError(400, str(error), param="temperature") from None
        prompt_tokens = len(self.counter.encode(prompt, raw=raw))
        context = self.lm.context_length
        limit = body.new_tokens_limit()
        max_new_tokens = limit if limit is not None else max(context - prompt_tokens, 1)  # None: the rest
        if prompt_tokens + max_new_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but the request needs "
                                f"{prompt_tokens + max_new_tokens} ({prompt_tokens} in the {prompt_param}, "
                                f"{max_new_tokens} to generate): shorten the {prompt_param} or lower max_tokens",
                           param="max_tokens" if limit is not None else prompt_param,
                           code="context_length_exceeded")
        if self.settings.max_prompt_tokens is not None and prompt_tokens > self.settings.max_prompt_tokens:
            raise APIError(400, f"the {prompt_param} has {prompt_tokens} tokens, more than this server's limit of "
                                f"{self.settings.max_prompt_tokens}: shorten it", param=prompt_param,
                           code="context_length_exceeded")
        stops = body.stop_strings()
        options = dict(method=method, max_new_tokens=max_new_tokens, temperature=body.temperature,
                       top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stops, raw=raw,
                       ignore_eos=body.ignore_eos)
        return Prepared(prompt, options, prompt_tokens, tau, stops)

    def _method(self, body: GenerationRequest) -> tuple[Method, float | None]:
        """The request's method (its tau filled in when the request or the server sets one), and
        the threshold in effect (None for methods without one), reported back to the client."""
        try:
            method = Method.parse(body.method or self.settings.method, self.lm.quant.bits)
        except RiverError as error:
            raise APIError(400, str(error), param="method") from None
        tau = body.tau
        if tau is not None and not method.uses_tau:
            raise APIError(400, f"tau only applies to methods with an exit threshold, not '{method.name}'",
                           param="tau")
        if tau is None and body.method is None and method.tau is None:
            tau = self.settings.tau  # the server's --tau goes with its --method only
        if tau is not None:
            try:
                method = check_generation_options(method, tau)
            except RiverError as error:
                raise APIError(400, str(error), param="tau") from None
        if not method.uses_tau:
            return method, None
        return method, method.tau if method.tau is not None else self.lm.default_tau(method.bits)


# --- responses ---------------------------------------------------------------------------------


def river_stats(result: GenerationResult, tau: float | None) -> dict:
    """What River-LLM did for this request: the extra `river` field of every answer."""
    return {"method": result.method, "tau": tau, "exit_layers": result.exit_layers,
            "mean_exit_layer": result.mean_exit_layer, "num_layers": result.num_layers,
            "full_precision_share": result.full_precision_share, "tokens_per_s": result.tokens_per_s,
            "prefill_s": result.prefill_s}


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}


class Reply:
    """The JSON objects of one answer, in chat or in completion shape."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def complete(self, result: GenerationResult, river: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=usage(result), river=river)

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, result: GenerationResult) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(result))


def field_path(loc: tuple) -> str:
    """"messages.0.content" from a pydantic error location, without the names pydantic gives the
    members of a union ("str", "list[str]", "function-after[...]")."""
    union_tags = {"str", "int", "float", "bool", "list", "dict", "none"}
    parts = [str(part) for part in loc
             if not (isinstance(part, str) and (part in union_tags or "[" in part or part.startswith("function-")))]
    return ".".join(parts)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return APIError(0, message, type, param, code).body()


# --- the app -----------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


class RequestGate:
    """ASGI middleware in front of every route: enforces the API key on /v1/* (before the body is
    even read), the body-size limit, and counts every answer (500s included) by endpoint and
    status for /metrics."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int = 1 << 20):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.api_key = api_key.encode() if api_key is not None else None
        self.too_large = f"the request body is over this server's limit of {max_body_bytes} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models/") else "other"
        if endpoint.startswith("/v1/models/"):
            endpoint = "/v1/models"
        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
            await self._refuse(scope, receive, send, endpoint, 401, "invalid_api_key",
                               "Incorrect or missing API key: send 'Authorization: Bearer <key>'")
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send, endpoint, 413, "request_too_large", self.too_large)
            return
        status = 499  # unless a response starts: the client left first
        received, too_large = 0, False

        async def counted_receive():
            # A chunked body declares no length: count it as it arrives, and stop reading it.
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                too_large = True
                raise BodyTooLarge()
            return message

        async def send_and_note(message) -> None:
            nonlocal status
            if too_large:  # whatever the app made of the cut body, the answer is a 413
                if message["type"] == "http.response.start" and status == 499:
                    status = 413
                    await self._refuse(scope, receive, send, endpoint, 413, "request_too_large", self.too_large, count=False)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, send_and_note)
        except Exception:
            if too_large and status == 499:
                status = 413
                await self._refuse(scope, receive, send, endpoint, 413, "request_too_large", self.too_large, count=False)
                return
            # Answered as a 500 by the error handler outside this middleware: count it as one.
            if status == 499:
                status = 500
            raise
        finally:
            self.metrics.count_request(endpoint, status)

    async def _refuse(self, scope, receive, send, endpoint: str, status: int, code: str, message: str,
                      count: bool = True) -> None:
        response = JSONResponse(error_body(message, "invalid_request_error", code), status_code=status,
                                headers={"Connection": "close"} if status == 413 else None)  # unread body
        if count:
            self.metrics.count_request(endpoint, status)
        await response(scope, receive, send)

    def _authorized(self, scope) -> bool:
        """Compared as bytes, never decoded: a malformed or non-ASCII header is just a wrong key."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)


class JobStream(StreamingResponse):
    """A server-sent-event answer that cancels its job however the response ends: finished (a
    no-op), failed, or cut short because the client left, even before the first chunk."""

    def __init__(self, events: AsyncIterator[str], job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(lm: RiverLM, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `lm`. Its model worker starts and stops with the app's lifespan."""
    settings = settings or ServerSettings()
    metrics = Metrics(lm.num_layers)
    worker = ModelWorker(lm, metrics, BatchSettings(settings.max_batch_size, settings.kv_cache_tokens,
                                                    settings.threads))
    prepare = Preparer(lm, settings)
    # Tokenizing and templating a prompt can take long: never on the event loop. One thread, as
    # the preparer's tokenizer copy must not be used by two threads at once.
    preparing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="riverllm-prepare")
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)
        preparing.shutdown(wait=False, cancel_futures=True)

    # With a key, the schema and docs routes are off: they are outside /v1 and would answer anyone.
    docs = {} if settings.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="River-LLM", lifespan=lifespan, **docs)
    app.add_middleware(RequestGate, metrics=metrics, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.state.worker, app.state.metrics = worker, metrics

    # --- errors: always an OpenAI-style body, never a traceback to the client ---

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RiverError)
    async def river_error(request: Request, error: RiverError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for problem in error.errors():
            if problem["type"] == "json_invalid":
                detail = problem.get("ctx", {}).get("error", "")
                problems.append(f"the request body is not valid JSON ({detail})")
                continue
            where = field_path(problem["loc"][1:])  # [0] is "body"
            if not where:
                problems.append("the request body must be a JSON object (Content-Type: application/json)")
                continue
            params.append(where)
            problem_text = f"{where}: {problem['msg']}"
            if problem_text not in problems:
                problems.append(problem_text)
        return JSONResponse(error_body("; ".join(problems), "invalid_request_error",
                                       param=params[0] if params else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message += " (endpoints: " + ", ".join(ENDPOINTS) + ")"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)

    # --- plain endpoints ---

    def model_card() -> dict:
        return {"id": lm.name, "object": "model", "created": started, "owned_by": "riverllm",
                "num_layers": lm.num_layers, "context_length": lm.context_length}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != lm.name:
            raise APIError(404, f"The model '{model_id}' does not exist: this server serves '{lm.name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = worker.alive
        return JSONResponse({"status": "ok" if alive else "worker stopped", "model": lm.name,
                             "queue_length": worker.waiting}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    # --- generation ---

    async def next_event(job: Job, request: Request) -> StreamEvent:
        """The job's next event (raising the job's error). Raises ClientGone once the client has
        left, checked before every event and every DISCONNECT_POLL_S while waiting; the caller
        then cancels the job."""
        while True:
            if await request.is_disconnected():  # cheap: does not wait for the client
                raise ClientGone()
            try:
                item = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(item, Exception):
                raise item
            return item

    async def stream_answer(request: Request, job: Job, first: StreamEvent, reply: Reply, prepared: Prepared,
                            include_usage: bool) -> AsyncIterator[str]:
        try:
            if reply.chat:
                yield sse(reply.chunk(text="", role=True))
            # The worker's text stream (riverllm.textstream) already holds back what may still grow
            # into a stop string; the finished answer (cut before any stop) settles the rest.
            sent, event = 0, first
            while event.result is None:
                if event.text:
                    sent += len(event.text)
                    yield sse(reply.chunk(event.text))
                event = await next_event(job, request)
            result = event.result
            rest = result.text[sent:]
            if rest:
                yield sse(reply.chunk(rest))
            yield sse(reply.chunk(None if reply.chat else "", finish_reason=result.finish_reason,
                                  river=river_stats(result, prepared.tau)))
            if include_usage:
                yield sse(reply.usage_chunk(result))
            yield sse("[DONE]")
        except ClientGone:
            return
        except APIError as error:
            yield sse(error.body())
        except RiverError as error:
            yield sse(error_body(str(error), "invalid_request_error"))
        except Exception as error:  # a bug mid-stream: tell the client in-band, keep the server
            logger.exception("generation failed mid-stream")
            yield sse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"))

    async def answer(request: Request, body: GenerationRequest, prepared: Prepared, chat: bool) -> Response:
        if worker.waiting >= settings.max_queue:
            full = APIError(429, f"the server's queue is full ({worker.waiting} requests waiting): retry later",
                            type="server_error", code="queue_full")
            return JSONResponse(full.body(), status_code=429, headers={"Retry-After": str(worker.retry_after_s())})
        job = Job(prepared.prompt, prepared.options, prepared.prompt_tokens, asyncio.get_running_loop())
        worker.submit(job)
        reply = Reply(chat, lm.name)
        try:
            # Wait for the first token before answering, so that an error is still a plain 4xx.
            event = await next_event(job, request)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return JobStream(stream_answer(request, job, event, reply, prepared, include_usage), job)
            while event.result is None:
                event = await next_event(job, request)
            return JSONResponse(reply.complete(event.result, river_stats(event.result, prepared.tau)))
        except ClientGone:
            job.cancel()
            return Response(status_code=499)  # nobody reads it; noted in the request counts
        except BaseException:
            job.cancel()
            raise

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = await asyncio.get_running_loop().run_in_executor(
            preparing, prepare, body, body.prompt_text(), True, "prompt")
        return await answer(request, body, prepared, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = await asyncio.get_running_loop().run_in_executor(
            preparing, prepare, body, body.template_messages(), False, "messages")
        return await answer(request, body, prepared, chat=True)

    return app


def serve(lm: RiverLM, settings: ServerSettings, log_level: str = "info") -> None:
    """Run the server until Ctrl-C. Builds the default method's river first (and under the ggml
    kernels its twins' prompt copies), so that the first request does not wait for it."""
    import uvicorn

    settings.check()
    method = Method.parse(settings.method, lm.quant.bits)
    if method.needs_river:
        lm.engine.twins(lm.river(method.bits))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach this host can use the model",
                       settings.host)
    uvicorn.Server(uvicorn_config(create_app(lm, settings), settings, log_level)).run()


def uvicorn_config(app: FastAPI, settings: ServerSettings, log_level: str = "info"):
    """uvicorn's own limits: idle keep-alive connections closed after `keep_alive_s`, at most
    `max_connections` connections and requests at once (503 beyond), request heads of at most
    64 KiB (h11), and a graceful shutdown that does not wait forever."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.max_connections,
                          h11_max_incomplete_event_size=64 << 10, timeout_graceful_shutdown=5)
