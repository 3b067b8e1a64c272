"""vLLM dense vs River under vLLM vs riverllm's own server: throughput and latency under load.

    # in the vLLM environment (scripts/test_vllm.sh makes one); riverllm's own server runs with --riverllm-python
    python scripts/vllm_load_test.py --model smollm2-135m --concurrency 1,8,32 --threads 1 \\
        --riverllm-python python --out docs/results/vllm_plugin

Servers, one after the other, each on its own: `riverllm serve --engine vllm --method dense`,
`... --method river:TAU` (vLLM's OpenAI server with the River model) and `riverllm serve --method
river:TAU` (riverllm's own server). For each concurrency C: 2C greedy chat requests (at least 8)
from C clients, max_tokens tokens each (ignore_eos, so every request costs the same); tokens/s,
latency p50/p99. River's mean exit layer (decoding steps) comes from the plugin's stats file
(RIVERLLM_VLLM_STATS) and from riverllm's per-token `exit_layers`.

Answers are compared, not asserted: the answers of every server at concurrency 1 against vLLM
dense's (River at tau > 1 must equal it: tests/test_vllm_engine.py asserts that), and each
server's answers under load against its own at concurrency 1 (float32 matmuls that change kernel
with the batch size can flip a near-tie).

Reuses scripts/load_test.py's helpers (percentiles, machine, ports, uptime).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import (PROMPTS, free_port, machine, percentiles, uptime,  # noqa: E402
                       wait_until_healthy, write_atomically)


def start(command: list[str], environment: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    return wait_until_healthy(server, port, 1800, f"; see {log}")  # conversion + HQQ on a shared 2-core CPU


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - started
    data = response.json()
    if response.status_code != 200:
        raise SystemExit(f"error: request failed: {response.status_code} {data}")
    return {"prompt": prompt, "text": data["choices"][0]["message"]["content"], "latency_s": latency,
            "tokens": data["usage"]["completion_tokens"], "exit_layers": (data.get("river") or {}).get("exit_layers")}


async def load(url: str, concurrency: int, max_tokens: int) -> dict:
    """2C requests (at least 8) from C clients, prompts in turn."""
    count = max(8, 2 * concurrency)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(PROMPTS[index % len(PROMPTS)])
    answers: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await one(client, model, PROMPTS[0], 4)  # warm-up, not timed

        async def worker() -> None:
            while not queue.empty():
                answers.append(await one(client, model, queue.get_nowait(), max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(a["tokens"] for a in answers)
    layers = [layer for a in answers if a["exit_layers"] for layer in a["exit_layers"][1:]]
    return {"concurrency": concurrency, "requests": count, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_s": percentiles([a["latency_s"] for a in answers]),
            "answers": {a["prompt"]: a["text"] for a in answers},
            "consistent": all(a["text"] == next(b["text"] for b in answers if b["prompt"] == a["prompt"]) for a in answers),
            "own_mean_exit_layer": sum(layers) / len(layers) if layers else None}


def read_stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


async def flush_stats(url: str) -> None:
    """A prefill-only request after a pause: its step writes the stats file (decode counts unchanged)."""
    await asyncio.sleep(0.7)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await one(client, model, PROMPTS[0], 1)
    await asyncio.sleep(0.2)


def decode_mean(before: dict | None, after: dict | None) -> float | None:
    if not after:
        return None
    old = before["decode_exit_histogram"] if before else [0] * len(after["decode_exit_histogram"])
    counts = [a - b for a, b in zip(after["decode_exit_histogram"], old)]
    return sum(i * n for i, n in enumerate(counts)) / sum(counts) if sum(counts) else None


def run_server(name: str, command: list[str], environment: dict[str, str], port: int, args, workdir: Path) -> dict:
    stats_path = workdir / f"{name}-stats.json"
    environment = {**environment, "RIVERLLM_VLLM_STATS": str(stats_path)}
    started = time.perf_counter()
    server = start(command, environment, port, workdir / f"{name}.log")
    result = {"name": name, "command": shlex.join(command), "start_s": time.perf_counter() - started, "runs": []}
    url = f"http://127.0.0.1:{port}"
    try:
        for concurrency in args.concurrency:
            asyncio.run(flush_stats(url))
            before = read_stats(stats_path)
            run = asyncio.run(load(url, concurrency, args.max_tokens))
            asyncio.run(flush_stats(url))
            run["vllm_mean_exit_layer"] = decode_mean(before, read_stats(stats_path))
            run["uptime"] = uptime()
            result["runs"].append(run)
            mean_exit = run["vllm_mean_exit_layer"] or run["own_mean_exit_layer"]
            print(f"{name} C={concurrency}: {run['tokens_per_s']:.1f} tok/s, p50 {run['latency_s']['p50']:.2f} s, "
                  f"p99 {run['latency_s']['p99']:.2f} s, mean exit {mean_exit}", flush=True)
    finally:
        server.terminate()
        server.wait(120)
    return result


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# River under vLLM vs vLLM dense vs riverllm's server: `{report['model']}`, {report['threads']} "
             f"thread(s)", "", f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, shared with other work), torch {m.get('torch', '?')}, "
             f"vLLM {report['vllm_version']} (CPU build). `uptime` before: `{report['uptime_before']}`; after: "
             f"`{report['uptime_after']}`. One run per cell (no repeats): with other processes on the 2 cores "
             "the figures carry their noise; compare rows of one table, not tables.", "",
             f"Each cell: max(8, 2C) greedy chat requests from C concurrent clients, {report['max_tokens']} tokens "
             "each (ignore_eos). Mean exit layer: decoding steps only (the backbone layers a generated token ran).",
             "", "| server | C | tok/s | latency p50 / p99 (s) | mean exit layer | answers = vLLM dense's | "
             "= riverllm River's | = its own at C=1 |", "|---|---|---|---|---|---|---|---|"]
    alone_answers = {server["name"]: server["runs"][0]["answers"] for server in report["servers"]}

    def agree(answers: dict, reference_server: str) -> str:
        reference = alone_answers.get(reference_server)
        return "-" if reference is None else f"{sum(answers[p] == reference.get(p) for p in answers)}/{len(answers)}"

    for server in report["servers"]:
        for run in server["runs"]:
            mean_exit = run["vllm_mean_exit_layer"] if run["vllm_mean_exit_layer"] is not None else run["own_mean_exit_layer"]
            lines.append(f"| {server['name']} | {run['concurrency']} | {run['tokens_per_s']:.1f} | "
                         f"{run['latency_s']['p50']:.2f} / {run['latency_s']['p99']:.2f} | "
                         f"{'-' if mean_exit is None else f'{mean_exit:.2f}'} | {agree(run['answers'], 'vllm-dense')} | "
                         f"{agree(run['answers'], 'riverllm-river')} | {agree(run['answers'], server['name'])} |")
    lines += ["", "Answers are compared per distinct prompt, against the named server's answer at C=1."]
    lines += ["", "Servers (started one after the other):", ""]
    lines += [f"- {s['name']} (up in {s['start_s']:.0f} s): `{s['command']}`" for s in report["servers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, help="only rewrite the .md of this earlier .json report")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="model threads of every server")
    parser.add_argument("--servers", default="vllm-dense,vllm-river,riverllm-river")
    parser.add_argument("--riverllm-python", default=None,
                        help="Python of riverllm's own server (default: this one); the main environment's")
    parser.add_argument("--out", type=Path, default=Path("docs/results/vllm_plugin"))
    args = parser.parse_args()
    if args.markdown:
        write_atomically(args.markdown.with_suffix(".md"), markdown(json.loads(args.markdown.read_text())))
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    import vllm

    def command(name: str, port: int) -> list[str]:
        serve = ["-m", "riverllm.cli", "serve", "--model", args.model, "--port", str(port), "--threads", str(args.threads)]
        if name == "riverllm-river":
            return [args.riverllm_python or sys.executable, *serve, "--method", f"river:{args.tau}",
                    "--max-batch-size", str(max(args.concurrency))]
        method = "dense" if name == "vllm-dense" else f"river:{args.tau}"
        # vLLM may batch up to the highest concurrency (its CPU default is lower on small machines);
        # no prefix caching for dense either, as for River (the same work per request).
        return [sys.executable, *serve, "--engine", "vllm", "--method", method, "--",
                "--max-num-seqs", str(max(args.concurrency)), "--no-enable-prefix-caching"]

    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    report = {"model": args.model, "threads": args.threads, "tau": args.tau, "max_tokens": args.max_tokens,
              "command": "python " + shlex.join(sys.argv), "machine": machine(), "vllm_version": vllm.__version__,
              "uptime_before": uptime(), "servers": []}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.servers.split(","):
            port = free_port()
            report["servers"].append(run_server(name, command(name, port), environment, port, args, Path(workdir)))
    report["uptime_after"] = uptime()
    stem = f"{args.model.replace('/', '_')}-threads{args.threads}"
    write_atomically(args.out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    write_atomically(args.out / f"{stem}.md", markdown(report))
    print(f"written: {args.out / stem}.md")


if __name__ == "__main__":
    main()
