"""Load test for `riverllm serve`: many requests from concurrent clients, every answer checked.

    python scripts/load_test.py                          # starts `riverllm serve` itself (CPU or GPU)
    python scripts/load_test.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server
    python scripts/load_test.py --requests 200 --concurrency 16 --max-tokens 8 --device cpu

First one greedy reference answer is fetched, one request at a time, for each prompt and endpoint.
Then N requests (chat and completion, streamed or not, some streams closed after their first
token) go out from C concurrent clients. An answer is correct when its text, finish_reason, token
count and per-token exit layers equal the reference (the server runs requests one at a time, so
load must not change any answer); a cancelled stream is correct when what it received is a
prefix of the reference. Afterwards the server must report itself healthy with an empty queue.

Writes docs/results/server_load.json and .md (latency and time-to-first-token percentiles,
throughput, the machine, and the exact command) unless --no-write. tests/test_server.py runs
`run_load` against its own server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "Write the number after 41.",
    "Give one word that rhymes with cat.",
]


@dataclass(frozen=True)
class Plan:
    index: int
    prompt: str
    chat: bool  # /v1/chat/completions, else /v1/completions
    stream: bool
    cancel: bool  # a stream closed by the client after its first token


@dataclass
class Outcome:
    plan: Plan
    ok: bool = False
    problem: str = ""
    cancelled: bool = False  # the client really closed the stream before the end
    latency_s: float = 0.0
    ttft_s: float | None = None  # streams: time to the first text
    completion_tokens: int = 0


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    exit_layers: list[int] | None = None
    ttft_s: float | None = None
    closed_early: bool = False
    error: dict | None = None


def plan_requests(count: int, stream_share: float, cancel_share: float, seed: int = 0) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        stream = rng.random() < stream_share
        plans.append(Plan(index, rng.choice(PROMPTS), chat=rng.random() < 0.5, stream=stream,
                          cancel=stream and rng.random() < cancel_share / max(stream_share, 1e-9)))
    return plans


def request_body(model: str, prompt: str, chat: bool, stream: bool, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def send(client: httpx.AsyncClient, model: str, prompt: str, chat: bool, stream: bool, max_tokens: int,
               close_after_first: bool = False) -> Answer:
    """One request; a stream is read chunk by chunk (and closed early if asked)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = request_body(model, prompt, chat, stream, max_tokens)
    if not stream:
        response = await client.post(path, json=body)
        data = response.json()
        if response.status_code != 200:
            return Answer(error={"status": response.status_code, **data})
        choice = data["choices"][0]
        return Answer(choice["message"]["content"] if chat else choice["text"], choice["finish_reason"],
                      data["usage"]["completion_tokens"], data["river"]["exit_layers"])
    answer, start = Answer(), time.perf_counter()
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Answer(error={"status": response.status_code, **response.json()})
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                answer.error = chunk["error"]
                break
            if chunk.get("usage"):
                answer.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text = (choice["delta"].get("content") if chat else choice["text"]) or ""
                if text and answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - start
                answer.text += text
                if choice["finish_reason"]:
                    answer.finish_reason = choice["finish_reason"]
                    answer.exit_layers = chunk["river"]["exit_layers"]
            if close_after_first and answer.text and answer.finish_reason is None:
                answer.closed_early = True
                break  # leaving the block closes the connection mid-stream
    return answer


def check(answer: Answer, reference: Answer) -> str:
    """'' when the answer is right, else what is wrong."""
    if answer.error:
        return f"error {answer.error}"
    if answer.closed_early:
        return "" if reference.text.startswith(answer.text) else f"prefix {answer.text!r} not in {reference.text!r}"
    for name in ("text", "finish_reason", "completion_tokens", "exit_layers"):
        if getattr(answer, name) != getattr(reference, name):
            return f"{name} {getattr(answer, name)!r} != reference {getattr(reference, name)!r}"
    return ""


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": sum(ordered) / len(ordered),
            "max": ordered[-1]}


async def run_load(url: str, requests: int = 200, concurrency: int = 16, max_tokens: int = 8,
                   stream_share: float = 0.5, cancel_share: float = 0.15, api_key: str | None = None,
                   seed: int = 0, timeout_s: float = 600.0) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        references = {}
        for prompt in PROMPTS:  # one at a time, before the load
            for chat in (True, False):
                reference = await send(client, model, prompt, chat, False, max_tokens)
                if reference.error:
                    raise RuntimeError(f"reference request failed: {reference.error}")
                references[prompt, chat] = reference

        plans = plan_requests(requests, stream_share, cancel_share, seed)
        pending: asyncio.Queue[Plan] = asyncio.Queue()
        for plan in plans:
            pending.put_nowait(plan)
        outcomes: list[Outcome] = []

        async def client_loop() -> None:
            while not pending.empty():
                plan = pending.get_nowait()
                outcome, start = Outcome(plan), time.perf_counter()
                try:
                    answer = await send(client, model, plan.prompt, plan.chat, plan.stream, max_tokens, plan.cancel)
                    outcome.problem = check(answer, references[plan.prompt, plan.chat])
                    outcome.cancelled, outcome.ttft_s = answer.closed_early, answer.ttft_s
                    outcome.completion_tokens = answer.completion_tokens or 0
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    outcome.problem = f"{type(error).__name__}: {error}"
                outcome.latency_s = time.perf_counter() - start
                outcome.ok = not outcome.problem
                outcomes.append(outcome)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start

        # The server must come back to idle: cancelled streams free the worker, nothing hangs.
        for _ in range(120):
            health = await client.get("/health")
            if health.status_code == 200 and health.json()["queue_length"] == 0 and \
                    "riverllm_running 0" in (await client.get("/metrics")).text:
                break
            await asyncio.sleep(0.5)
        metrics_text = (await client.get("/metrics")).text

    completed = [o for o in outcomes if o.ok and not o.cancelled]
    tokens = sum(o.completion_tokens for o in completed)
    return {
        "url": url, "model": model, "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
        "streamed": sum(o.plan.stream for o in outcomes), "cancelled": sum(o.cancelled for o in outcomes),
        "correct": sum(o.ok for o in outcomes),
        "failures": [{"plan": asdict(o.plan), "problem": o.problem} for o in outcomes if not o.ok],
        "wall_s": wall_s, "requests_per_s": len(outcomes) / wall_s,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
        "latency_s": percentiles([o.latency_s for o in completed]),
        "ttft_s": percentiles([o.ttft_s for o in completed if o.ttft_s is not None]),
        "healthy_after": health.status_code == 200 and health.json()["queue_length"] == 0,
        "server_metrics": {line.split()[0]: float(line.split()[1]) for line in metrics_text.splitlines()
                           if line.startswith("riverllm_") and "{" not in line},
    }


# --- running it from the command line ----------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}  # other work sharing the CPU
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, device: str | None, method: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "riverllm.cli", "serve", "--model", model, "--port", str(port),
               "--method", method]
    if device:
        command += ["--device", device]
    server = subprocess.Popen(command)
    deadline = time.time() + 900  # loading the model and building its river
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.terminate()
    raise SystemExit("error: the server did not come up within 15 minutes")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def markdown(report: dict) -> str:
    def row(name: str, stats: dict) -> str:
        return f"| {name} | " + " | ".join(f"{stats[k]:.3f}" for k in ("p50", "p90", "p99", "mean", "max")) + " |"

    m = report["machine"]
    lines = [
        "# riverllm serve: load test", "",
        f"Command: `{report['command']}`", "",
        f"Server: model `{report['model']}`, method `{report['method']}`, one request at a time (FIFO).  ",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m.get('gpu') or 'no GPU'}, {m['platform']}, "
        f"torch {m.get('torch', '?')}; load average {m['load_average_1min']:.1f} when the run ended "
        "(other processes sharing the CPU slow every number below).  ",
        f"Load: {report['requests']} requests from {report['concurrency']} concurrent clients, "
        f"max_tokens {report['max_tokens']}, greedy; {report['streamed']} streamed, "
        f"{report['cancelled']} streams closed by the client after their first token.", "",
        f"**Correct answers: {report['correct']} / {report['requests']}** (text, finish_reason, token count "
        f"and per-token exit layers equal to a reference fetched alone; cancelled: a prefix of it). "
        f"Healthy with an empty queue afterwards: {'yes' if report['healthy_after'] else 'NO'}.", "",
        "| seconds | p50 | p90 | p99 | mean | max |", "|---|---|---|---|---|---|",
        row("latency (completed requests)", report["latency_s"]),
    ]
    if report["ttft_s"]:
        lines.append(row("time to first token (streams)", report["ttft_s"]))
    lines += [
        "", f"Throughput: {report['requests_per_s']:.2f} requests/s, {report['tokens_per_s']:.1f} generated "
            f"tokens/s over {report['wall_s']:.1f} s (completed requests' tokens; the server's own count, "
            f"cancelled ones included, is {report['server_metrics'].get('riverllm_generated_tokens_total', 0):.0f}"
            f" tokens at {report['server_metrics'].get('riverllm_tokens_per_second', 0):.1f} tokens/s of "
            f"generation time; mean exit layer {report['server_metrics'].get('riverllm_mean_exit_layer', 0):.2f}"
            f" of {report['server_metrics'].get('riverllm_num_layers', 0):.0f}).", "",
        "Latency includes the wait in the queue: with one request at a time and 16 clients, a request "
        "mostly waits for the others ahead of it.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("RIVERLLM_API_KEY"))
    parser.add_argument("--model", default="smollm2-135m", help="model for the server this script starts")
    parser.add_argument("--device", default=None, help="device for the server this script starts")
    parser.add_argument("--method", default="river", help="method of the server this script starts")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--cancel-share", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        port = free_port()
        server = start_server(args.model, args.device, args.method, port)
        url = f"http://127.0.0.1:{port}"
    try:
        report = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens, args.stream_share,
                                      args.cancel_share, args.api_key))
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    report.update(command="python " + shlex.join(sys.argv), machine=machine(),
                  method=args.method if args.url is None else "(the server's default)",
                  server_started_by_script=args.url is None)
    summary = (f"{report['correct']}/{report['requests']} correct, latency p50 {report['latency_s']['p50']:.2f} s "
               f"p99 {report['latency_s']['p99']:.2f} s, {report['tokens_per_s']:.1f} tokens/s")
    print(summary)
    for failure in report["failures"][:10]:
        print("FAILED", failure, file=sys.stderr)
    if not args.no_write:
        write_atomically(args.out / "server_load.json", json.dumps(report, indent=2) + "\n")
        write_atomically(args.out / "server_load.md", markdown(report))
        print(f"written: {args.out / 'server_load.json'}, {args.out / 'server_load.md'}")
    sys.exit(0 if not report["failures"] and report["healthy_after"] else 1)


if __name__ == "__main__":
    main()
