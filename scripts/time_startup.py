"""Time a whole `riverllm` command from process start: to its first byte on stdout (the first
token of `riverllm generate`) and to its exit, over several runs; min and median.

    python scripts/time_startup.py --runs 3 --out docs/results/model_cache/second_run_q05 -- \
        riverllm generate -m qwen2.5-coder-0.5b -p "Write hello world in C" -n 8

--first-run: every run gets an empty riverllm cache (RIVERLLM_CACHE, a fresh temp folder holding
links to the installed GGUFs only), so it pays the GGUF conversion and the river build: a new
user's first run. Otherwise one untimed warm-up run fills the cache, and the timed runs are
second runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def installed_cache() -> Path:
    configured = os.environ.get("RIVERLLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "riverllm"


def fresh_cache(parent: Path) -> Path:
    """An empty riverllm cache with links to the installed GGUF folders (nothing converted or built)."""
    cache = Path(tempfile.mkdtemp(prefix="riverllm-first-run-", dir=parent))
    for folder in installed_cache().iterdir():
        if folder.is_dir() and any(folder.glob("*.gguf")):
            (cache / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return cache


def time_once(command: list[str], env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - start
    rest, err = proc.communicate()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {err.decode()[-500:]}")
    return {"first_token_s": first_byte if first else total, "total_s": total,
            "summary": err.decode().strip().splitlines()[-1] if err.strip() else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--first-run", action="store_true", help="every run starts from an empty cache")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = dict(os.environ)
    scratch = Path(tempfile.mkdtemp(prefix="riverllm-startup-"))
    runs = []
    try:
        if not args.first_run:
            time_once(command, env)  # fills the cache
        for _ in range(args.runs):
            run_env = {**env, "RIVERLLM_CACHE": str(fresh_cache(scratch))} if args.first_run else env
            runs.append(time_once(command, run_env))
            if args.first_run:
                shutil.rmtree(run_env["RIVERLLM_CACHE"], ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "command": " ".join(command), "first_run": args.first_run, "runs": runs,
        "first_token_s": {"min": min(r["first_token_s"] for r in runs),
                          "median": statistics.median(r["first_token_s"] for r in runs)},
        "total_s": {"min": min(r["total_s"] for r in runs), "median": statistics.median(r["total_s"] for r in runs)},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_after": os.getloadavg(), "env": {k: env[k] for k in ("OMP_NUM_THREADS",) if k in env},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")  # not with_suffix: "qwen0.5b"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    table = ["| run | first token (s) | whole command (s) | summary line |", "|---|---|---|---|"]
    table += [f"| {i + 1} | {r['first_token_s']:.1f} | {r['total_s']:.1f} | {r['summary']} |" for i, r in enumerate(runs)]
    text = (f"`{result['command']}`{' (each run from an empty cache)' if args.first_run else ' (second runs)'}\n\n"
            + "\n".join(table) + f"\n\nfirst token: min {result['first_token_s']['min']:.1f} s, median "
            f"{result['first_token_s']['median']:.1f} s; load average after: "
            f"{', '.join(f'{x:.2f}' for x in result['load_average_after'])}\n")
    md_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
