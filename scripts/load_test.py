"""Load test for `riverllm serve`: FIFO against continuous batching, every answer checked.

    python scripts/load_test.py                           # starts a FIFO and a batching server, one after the other
    python scripts/load_test.py --model qwen2.5-coder-0.5b --max-batch-sizes 1,16
    python scripts/load_test.py --url http://127.0.0.1:8000 --api-key KEY   # one already running server

The plan (the same for every server): N requests from C concurrent clients, chat and completion,
half streamed, some streams closed by the client midway, some with seeded sampling, some
malformed (they must get a 400) and some longer than the context window (a 400
`context_length_exceeded`, before they wait). First each distinct request is sent alone, one at a
time, to the first server (`--max-batch-size 1`, FIFO): those are the batch-1 references. Every
server must give the same answers alone, and every answer under load must equal its reference
(text, finish_reason, token count and per-token exit layers); a cancelled stream must have
received a prefix of it. Afterwards each server must be healthy with an empty queue; its resident
memory is sampled during the run.

Writes docs/results/server_batching/<model>.json and .md (throughput in tokens/s and requests/s,
latency and time-to-first-token percentiles, the ratios against FIFO, memory, the machine, its
load, and the exact command) unless --no-write. tests/test_server.py runs `run_load` against its
own server.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "Write the number after 41.",
    "Give one word that rhymes with cat.",
    "Write a short poem about a river.",
    "Explain in two sentences why the sky is blue.",
    "List three animals that live in the sea.",
    "Tell me a fun fact about the moon.",
]
SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # sampled requests also send seed = 1000 + prompt index
KINDS = ("ok", "malformed", "over_context")


@dataclass(frozen=True)
class Plan:
    index: int
    prompt: str
    chat: bool  # /v1/chat/completions, else /v1/completions
    stream: bool
    cancel: bool  # a stream closed by the client midway (after half of max_tokens chunks)
    kind: str = "ok"  # ok | malformed (must get a 400) | over_context (must get a 400 context_length_exceeded)
    sampled: bool = False  # seeded sampling instead of greedy

    @property
    def reference_key(self) -> tuple:
        return self.prompt, self.chat, self.sampled


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


def plan_requests(count: int, stream_share: float, cancel_share: float, seed: int = 0,
                  malformed_share: float = 0.0, over_context_share: float = 0.0, sampled_share: float = 0.0) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        draw = rng.random()
        kind = "malformed" if draw < malformed_share else \
            "over_context" if draw < malformed_share + over_context_share else "ok"
        stream = rng.random() < stream_share
        cancel = kind == "ok" and stream and rng.random() < cancel_share / max(stream_share, 1e-9)
        plans.append(Plan(index, rng.choice(PROMPTS), chat=rng.random() < 0.5, stream=stream, cancel=cancel,
                          kind=kind, sampled=kind == "ok" and rng.random() < sampled_share))
    return plans


def request_body(model: str, prompt: str, chat: bool, stream: bool, max_tokens: int, sampled: bool = False) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if sampled:
        body.update(SAMPLING, seed=1000 + PROMPTS.index(prompt) if prompt in PROMPTS else 1000)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


MALFORMED = [  # bodies a careless client sends; each must get a 400 with an OpenAI-style error
    b'{"model": "MODEL", "messages": [',  # cut-off JSON
    b'{"model": "MODEL", "prompt": "hi", "max_tokens": "8"}',  # a number as a string
    b'{"model": "MODEL", "prompt": "hi", "temperature": -1}',  # out of range
    b'[1, 2, 3]',  # not an object
]


async def send_refused(client: httpx.AsyncClient, model: str, plan: Plan, context_length: int) -> str:
    """A malformed or over-context request: '' when it got the 400 it should, else what went wrong."""
    path = "/v1/chat/completions" if plan.chat else "/v1/completions"
    if plan.kind == "malformed":
        content = MALFORMED[plan.index % len(MALFORMED)].replace(b"MODEL", model.encode())
        response = await client.post(path, content=content, headers={"Content-Type": "application/json"})
        expected_code = None
    else:  # about one token per word: a prompt longer than the whole context window
        body = request_body(model, "word " * (context_length + 16), plan.chat, plan.stream, 8)
        response = await client.post(path, json=body)
        expected_code = "context_length_exceeded"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code} without an error body: {response.text[:200]!r}"
    if response.status_code != 400 or error.get("code") != expected_code or not error.get("message"):
        return f"expected a 400 ({expected_code}), got {response.status_code} {error}"
    return ""


async def send(client: httpx.AsyncClient, model: str, prompt: str, chat: bool, stream: bool, max_tokens: int,
               close_after: int | None = None, sampled: bool = False) -> Answer:
    """One request; a stream is read chunk by chunk (and closed after `close_after` text chunks if asked)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = request_body(model, prompt, chat, stream, max_tokens, sampled)
    if not stream:
        response = await client.post(path, json=body)
        data = response.json()
        if response.status_code != 200:
            return Answer(error={"status": response.status_code, **data})
        choice = data["choices"][0]
        return Answer(choice["message"]["content"] if chat else choice["text"], choice["finish_reason"],
                      data["usage"]["completion_tokens"], data["river"]["exit_layers"])
    answer, start, chunks = Answer(), time.perf_counter(), 0
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
                if text:
                    chunks += 1
                    if answer.ttft_s is None:
                        answer.ttft_s = time.perf_counter() - start
                answer.text += text
                if choice["finish_reason"]:
                    answer.finish_reason = choice["finish_reason"]
                    answer.exit_layers = chunk["river"]["exit_layers"]
            if close_after is not None and chunks >= close_after and answer.finish_reason is None:
                answer.closed_early = True
                break  # leaving the block closes the connection mid-stream
    return answer


def mean_batch_between(before: dict, after: dict) -> float:
    """Rows per decoding step between two /metrics readings."""
    steps = after.get("riverllm_decode_steps_total", 0.0) - before.get("riverllm_decode_steps_total", 0.0)
    rows = after.get("riverllm_decode_rows_total", 0.0) - before.get("riverllm_decode_rows_total", 0.0)
    return rows / steps if steps else 0.0


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


def parse_metrics(text: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("riverllm_") and "{" not in line}


async def fetch_references(url: str, plans: list[Plan], max_tokens: int, api_key: str | None = None,
                           timeout_s: float = 600.0) -> dict[tuple, Answer]:
    """Each distinct request of the plan, sent alone (one at a time): its batch-1 answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        references = {}
        for key in sorted({plan.reference_key for plan in plans if plan.kind == "ok"}):
            prompt, chat, sampled = key
            reference = await send(client, model, prompt, chat, False, max_tokens, sampled=sampled)
            if reference.error:
                raise RuntimeError(f"reference request failed: {reference.error}")
            references[key] = reference
    return references


async def run_load(url: str, requests: int = 200, concurrency: int = 16, max_tokens: int = 8,
                   stream_share: float = 0.5, cancel_share: float = 0.15, api_key: str | None = None,
                   seed: int = 0, timeout_s: float = 600.0, malformed_share: float = 0.0,
                   over_context_share: float = 0.0, sampled_share: float = 0.0,
                   references: dict[tuple, Answer] | None = None) -> dict:
    """Send the planned requests from `concurrency` clients and check every answer against its
    reference (fetched alone from this server first, unless given: e.g. another server's)."""
    plans = plan_requests(requests, stream_share, cancel_share, seed, malformed_share, over_context_share,
                          sampled_share)
    own_references = await fetch_references(url, plans, max_tokens, api_key, timeout_s)
    references = references or own_references
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model, context_length = card["id"], card.get("context_length", 2048)
        pending: asyncio.Queue[Plan] = asyncio.Queue()
        for plan in plans:
            pending.put_nowait(plan)
        outcomes: list[Outcome] = []
        memory: list[float] = []
        batch_sizes: list[float] = []

        async def client_loop() -> None:
            while not pending.empty():
                plan = pending.get_nowait()
                outcome, start = Outcome(plan), time.perf_counter()
                try:
                    if plan.kind != "ok":
                        outcome.problem = await send_refused(client, model, plan, context_length)
                    else:
                        answer = await send(client, model, plan.prompt, plan.chat, plan.stream, max_tokens,
                                            max(1, max_tokens // 2) if plan.cancel else None, plan.sampled)
                        outcome.problem = check(answer, references[plan.reference_key])
                        outcome.cancelled, outcome.ttft_s = answer.closed_early, answer.ttft_s
                        outcome.completion_tokens = answer.completion_tokens or 0
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    outcome.problem = f"{type(error).__name__}: {error}"
                outcome.latency_s = time.perf_counter() - start
                outcome.ok = not outcome.problem
                outcomes.append(outcome)

        async def watch() -> None:  # the server's memory and batch size while the load runs
            while True:
                current = parse_metrics((await client.get("/metrics")).text)
                memory.append(current.get("riverllm_resident_memory_bytes", 0.0))
                batch_sizes.append(current.get("riverllm_running", 0.0))
                await asyncio.sleep(0.5)

        metrics_before = parse_metrics((await client.get("/metrics")).text)
        memory_before = metrics_before.get("riverllm_resident_memory_bytes", 0.0)
        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
        watcher.cancel()

        # The server must come back to idle: cancelled streams free their rows, nothing hangs.
        for _ in range(120):
            health = await client.get("/health")
            if health.status_code == 200 and health.json()["queue_length"] == 0 and \
                    parse_metrics((await client.get("/metrics")).text)["riverllm_running"] == 0:
                break
            await asyncio.sleep(0.5)
        server_metrics = parse_metrics((await client.get("/metrics")).text)

    generated = [o for o in outcomes if o.plan.kind == "ok"]
    completed = [o for o in generated if o.ok and not o.cancelled]
    tokens = sum(o.completion_tokens for o in completed)
    memory_after = server_metrics.get("riverllm_resident_memory_bytes", 0.0)
    return {
        "url": url, "model": model, "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
        "streamed": sum(o.plan.stream for o in outcomes), "cancelled": sum(o.cancelled for o in outcomes),
        "sampled": sum(o.plan.sampled for o in outcomes),
        "malformed": sum(o.plan.kind == "malformed" for o in outcomes),
        "over_context": sum(o.plan.kind == "over_context" for o in outcomes),
        "correct": sum(o.ok for o in outcomes),
        "failures": [{"plan": asdict(o.plan), "problem": o.problem} for o in outcomes if not o.ok],
        "references_alone_agree": own_references == references,
        "wall_s": wall_s, "requests_per_s": len(completed) / wall_s,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
        "latency_s": percentiles([o.latency_s for o in completed]),
        "ttft_s": percentiles([o.ttft_s for o in completed if o.ttft_s is not None]),
        "mean_batch_size_seen": sum(batch_sizes) / len(batch_sizes) if batch_sizes else 0.0,
        # Rows per decoding step during the load only (the server's own mean_batch_size counts
        # since start, so it includes the references each server first answers alone).
        "mean_batch_size_load": mean_batch_between(metrics_before, server_metrics),
        "memory_bytes": {"before": memory_before, "peak": max(memory, default=0.0), "after": memory_after},
        "healthy_after": health.status_code == 200 and health.json()["queue_length"] == 0,
        "server_metrics": server_metrics,
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


def start_server(model: str, device: str | None, method: str, port: int, extra: list[str] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "riverllm.cli", "serve", "--model", model, "--port", str(port),
               "--method", method, *extra]
    if device:
        command += ["--device", device]
    return wait_until_healthy(subprocess.Popen(command), port, 900)  # loading the model and building its river


def wait_until_healthy(server: subprocess.Popen, port: int, limit_s: float, log: str = "") -> subprocess.Popen:
    """`server` once its /health answers 200; a one-line exit if it dies or takes longer than limit_s."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with code {server.returncode}{log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.terminate()
    raise SystemExit(f"error: the server did not come up within {limit_s / 60:.0f} minutes{log}")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def stats_row(name: str, stats: dict) -> str:
    if not stats:
        return f"| {name} | - | - | - | - | - |"
    return f"| {name} | " + " | ".join(f"{stats[k]:.3f}" for k in ("p50", "p90", "p99", "mean", "max")) + " |"


def markdown(report: dict) -> str:
    """One server's run."""
    m, sm = report["machine"], report["server_metrics"]
    mem = report["memory_bytes"]
    lines = [
        f"## `--max-batch-size {report.get('max_batch_size', '?')}`", "",
        f"**Correct: {report['correct']} / {report['requests']}** (generated answers: text, finish_reason, token "
        f"count and per-token exit layers equal to the batch-1 reference; cancelled streams: a prefix of it; "
        f"malformed and over-context requests: a 400 with an OpenAI-style error). "
        f"Healthy with an empty queue afterwards: {'yes' if report['healthy_after'] else 'NO'}.", "",
        "| seconds | p50 | p90 | p99 | mean | max |", "|---|---|---|---|---|---|",
        stats_row("latency (completed requests)", report["latency_s"]),
        stats_row("time to first token (streams)", report["ttft_s"]), "",
        f"Throughput: **{report['tokens_per_s']:.1f} generated tokens/s, {report['requests_per_s']:.2f} completed "
        f"requests/s** over {report['wall_s']:.1f} s ({report['completion_tokens']} tokens of completed requests). "
        f"Server: {sm.get('riverllm_generated_tokens_total', 0):.0f} tokens generated (cancelled ones included), "
        f"mean batch size per decoding step {report.get('mean_batch_size_load', 0):.2f} during the load "
        f"({sm.get('riverllm_mean_batch_size', 0):.2f} since the server started), "
        f"mean exit layer {sm.get('riverllm_mean_exit_layer', 0):.2f} of {sm.get('riverllm_num_layers', 0):.0f}.  ",
        f"Resident memory: {mem['before'] / 2**20:.0f} MiB before the load, peak {mem['peak'] / 2**20:.0f} MiB, "
        f"{mem['after'] / 2**20:.0f} MiB after. Load average when it ended: {m['load_average_1min']:.1f}.", "",
    ]
    return "\n".join(lines)


def comparison(reports: list[dict]) -> dict:
    """Batching against FIFO (the first report, --max-batch-size 1)."""
    fifo, *others = reports
    out = {}
    for other in others:
        out[str(other["max_batch_size"])] = {
            "tokens_per_s_ratio": other["tokens_per_s"] / fifo["tokens_per_s"],
            "requests_per_s_ratio": other["requests_per_s"] / fifo["requests_per_s"],
            "p99_latency_ratio": other["latency_s"]["p99"] / fifo["latency_s"]["p99"],
            "floor_met": other["tokens_per_s"] >= 3 * fifo["tokens_per_s"]
                         and other["latency_s"]["p99"] < fifo["latency_s"]["p99"],
        }
    return out


def compare_markdown(result: dict) -> str:
    reports, first = result["reports"], result["reports"][0]
    m = first["machine"]
    lines = [
        f"# riverllm serve under load: FIFO vs continuous batching, `{first['model']}`", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, shared with other work), {m.get('gpu') or 'no GPU'}, "
        f"torch {m.get('torch', '?')}; `uptime` before the run: `{result['uptime_before']}`, after: "
        f"`{result['uptime_after']}`. Each server's model worker runs one torch thread (the default on CPU: it "
        "keeps batched answers bit-identical to answers alone); the servers ran one after the other, not at once.",
        "",
        f"Load, the same plan for each server: {first['requests']} requests from {first['concurrency']} concurrent "
        f"clients, max_tokens {first['max_tokens']}, chat and completion mixed; {first['streamed']} streamed, "
        f"{first['cancelled']} streams closed by the client midway, {first['sampled']} with seeded sampling "
        f"(the rest greedy), {first['malformed']} malformed, {first['over_context']} over the context window.  ",
        "Every generated answer is checked against its batch-1 reference: the same request sent alone to the FIFO "
        "server before the load; each server's own answers alone are checked against those too "
        f"({'equal' if all(r['references_alone_agree'] for r in reports) else 'NOT EQUAL'}).", "",
        "| server | correct | tokens/s | requests/s | latency p50 / p90 / p99 (s) | TTFT p50 / p99 (s) | "
        "mean batch | memory before / peak / after (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lat, ttft, mem = r["latency_s"], r["ttft_s"] or {"p50": 0, "p99": 0}, r["memory_bytes"]
        lines.append(
            f"| `--max-batch-size {r['max_batch_size']}` | {r['correct']}/{r['requests']} | {r['tokens_per_s']:.1f} "
            f"| {r['requests_per_s']:.2f} | {lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} "
            f"| {ttft['p50']:.2f} / {ttft['p99']:.2f} "
            f"| {r.get('mean_batch_size_load', r['server_metrics'].get('riverllm_mean_batch_size', 0)):.2f} "
            f"| {mem['before'] / 2**20:.0f} / {mem['peak'] / 2**20:.0f} / {mem['after'] / 2**20:.0f} |")
    lines.append("")
    for size, c in result["comparison"].items():
        lines.append(f"Batching (`--max-batch-size {size}`) against FIFO: **{c['tokens_per_s_ratio']:.2f}x tokens/s**, "
                     f"{c['requests_per_s_ratio']:.2f}x requests/s, p99 latency {c['p99_latency_ratio']:.2f}x FIFO's. "
                     f"Floor (>= 3x throughput and a lower p99): **{'met' if c['floor_met'] else 'NOT met'}**.")
    lines.append("")
    lines += [markdown(r) for r in reports]
    return "\n".join(lines)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target a running server instead of starting FIFO and batching servers")
    parser.add_argument("--api-key", default=os.environ.get("RIVERLLM_API_KEY"))
    parser.add_argument("--model", default="smollm2-135m", help="model for the servers this script starts")
    parser.add_argument("--device", default=None, help="device for the servers this script starts")
    parser.add_argument("--method", default="river", help="method of the servers this script starts (river "
                        "alone takes this machine's calibrated tau if it has one: pin river:TAU to compare); "
                        "another than river is in the file's name")
    parser.add_argument("--kernels", default="torch", help="--kernels of the servers this script starts (torch | "
                        "ggml); a ggml run writes MODEL_ggml.json/.md")
    parser.add_argument("--dtype", default="auto", help="--dtype of the servers this script starts (auto: "
                        "bfloat16 on a CPU with native bfloat16); another than auto is in the file's name")
    parser.add_argument("--max-batch-sizes", default="1,16",
                        help="servers to start one after the other; the first is the baseline (1: FIFO)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--malformed-share", type=float, default=0.05)
    parser.add_argument("--over-context-share", type=float, default=0.05)
    parser.add_argument("--sampled-share", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("docs/results/server_batching"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load = dict(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                stream_share=args.stream_share, cancel_share=args.cancel_share, api_key=args.api_key,
                malformed_share=args.malformed_share, over_context_share=args.over_context_share,
                sampled_share=args.sampled_share)
    command = "python " + shlex.join(sys.argv)

    if args.url is not None:  # one running server
        report = asyncio.run(run_load(args.url, **load))
        report.update(command=command, machine=machine())
        reports = [report]
        print(f"{report['correct']}/{report['requests']} correct, {report['tokens_per_s']:.1f} tokens/s")
        ok = not report["failures"] and report["healthy_after"]
        result = {"command": command, "reports": reports}
    else:
        sizes = [int(size) for size in args.max_batch_sizes.split(",")]
        result = {"command": command, "method": args.method, "dtype": args.dtype, "uptime_before": uptime(),
                  "reports": []}
        references = None
        for size in sizes:
            port = free_port()
            server = start_server(args.model, args.device, args.method, port,
                                  ["--max-batch-size", str(size), "--kernels", args.kernels, "--dtype", args.dtype])
            try:
                if references is None:  # the batch-1 answers, from the first (FIFO) server, alone
                    plans = plan_requests(args.requests, args.stream_share, args.cancel_share, 0,
                                          args.malformed_share, args.over_context_share, args.sampled_share)
                    references = asyncio.run(fetch_references(f"http://127.0.0.1:{port}", plans, args.max_tokens,
                                                              args.api_key))
                report = asyncio.run(run_load(f"http://127.0.0.1:{port}", references=references, **load))
            finally:
                server.terminate()
                server.wait(60)
            report.update(max_batch_size=size, machine=machine())
            result["reports"].append(report)
            print(f"--max-batch-size {size}: {report['correct']}/{report['requests']} correct, "
                  f"{report['tokens_per_s']:.1f} tokens/s, {report['requests_per_s']:.2f} req/s, latency p50 "
                  f"{report['latency_s']['p50']:.2f} s p99 {report['latency_s']['p99']:.2f} s", flush=True)
            for failure in report["failures"][:10]:
                print("FAILED", failure, file=sys.stderr)
        result["uptime_after"] = uptime()
        result["comparison"] = comparison(result["reports"])
        for size, c in result["comparison"].items():
            print(f"batch {size} vs FIFO: {c['tokens_per_s_ratio']:.2f}x tokens/s, p99 {c['p99_latency_ratio']:.2f}x, "
                  f"floor {'met' if c['floor_met'] else 'NOT met'}")
        ok = all(not r["failures"] and r["healthy_after"] and r["references_alone_agree"] for r in result["reports"])
    if not args.no_write:
        name = args.model.replace("/", "_").removesuffix(".gguf") if args.url is None else "url"
        if args.url is None and args.kernels != "torch":
            name += f"_{args.kernels}"
        if args.url is None and args.dtype != "auto":
            name += f"_{args.dtype}"
        if args.url is None and args.method != "river":  # river's tau comes from the machine's profile
            name += "_" + args.method.replace(":", "-")
        write_atomically(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
        if args.url is None:
            write_atomically(args.out / f"{name}.md", compare_markdown(result))
        print(f"written: {args.out / name}.json")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
