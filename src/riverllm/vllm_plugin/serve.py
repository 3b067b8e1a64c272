"""`riverllm serve --engine vllm`: vLLM's own OpenAI server, with River as the model.

riverllm does not wrap vLLM's server: it converts a packaged model to a HuggingFace directory
(once, into riverllm's cache), then replaces itself with

    python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --enforce-eager \\
        --hf-overrides '{"architectures": ["RiverLlamaForCausalLM"], "river_tau": 0.9, ...}'

(`vllm serve` is the same server, but its console script is broken in vllm-cpu 0.32.0). Arguments
after `--` go to vLLM as they are (e.g. `-- --max-num-seqs 32`).

No vLLM import here: the command is built and checked in the main environment's tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from riverllm.errors import RiverError
from riverllm.policy import Method

# vLLM's CPU build reads these at start; setdefault keeps whatever the user exported.
CPU_SERVER_ENVIRONMENT = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}


def model_directory(model: str, progress: bool = True) -> Path:
    """A HuggingFace directory for `model`: itself, or its conversion in riverllm's cache."""
    from riverllm.loading import cache_dir, resolve_model
    from riverllm.vllm_plugin.convert import convert

    directory, gguf_file = resolve_model(model, progress=progress)
    if gguf_file is None:
        return directory
    name = model if "/" not in model and not model.endswith(".gguf") else Path(gguf_file).stem
    return convert(model, cache_dir() / "hf" / name)


def hf_overrides(architecture: str, method: str, tau: float | None, bits: int, group_size: int) -> dict:
    """The `--hf-overrides` that select River (empty for dense)."""
    from riverllm.vllm_plugin import DENSE_TO_RIVER

    parsed = Method.parse(method, bits)
    if parsed.kind == "dense":
        if tau is not None:
            raise RiverError("--tau applies to river; the dense method never exits")
        return {}
    if parsed.kind != "river":
        raise RiverError(f"--engine vllm serves dense or river[:TAU], not {method}")
    if architecture not in DENSE_TO_RIVER:
        raise RiverError(f"{architecture} has no River variant under vLLM; supported: {', '.join(DENSE_TO_RIVER)}")
    overrides = {"architectures": [DENSE_TO_RIVER[architecture]], "river_bits": parsed.bits,
                 "river_group_size": group_size}
    chosen = tau if tau is not None else parsed.tau
    if chosen is not None:  # else the plugin's own order: config file, calibration profile, default
        overrides["river_tau"] = chosen
    return overrides


def server_command(model_dir: Path, host: str, port: int, overrides: dict, served_name: str,
                   api_key: str | None = None, extra: list[str] = ()) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", host, "--port", str(port),
               "--dtype", "float32", "--enforce-eager"]
    if overrides:
        command += ["--hf-overrides", json.dumps(overrides)]
        if not any("prefix-caching" in arg for arg in extra):
            # A cached prefix keeps the K/V of the path (backbone or twins) that an earlier request
            # took; River's prompt depth would then depend on what ran before (docs/vllm.md).
            command.append("--no-enable-prefix-caching")
    if api_key:
        command += ["--api-key", api_key]
    return command + list(extra)


def server_environment(threads: int | None) -> dict[str, str]:
    environment = dict(os.environ)
    for name, value in CPU_SERVER_ENVIRONMENT.items():
        environment.setdefault(name, value)
    if threads is not None:
        if threads < 1 or threads > (os.cpu_count() or 1):
            raise RiverError(f"--threads must be in 1..{os.cpu_count()}, got {threads}")
        # vLLM's CPU worker pins one OpenMP thread per listed core.
        environment["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    return environment


def check_vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise RiverError("vLLM is not installed in this Python: install riverllm[vllm] in its own environment "
                         "(docs/vllm.md, scripts/test_vllm.sh)")


def exec_server(model: str, host: str, port: int, method: str, tau: float | None, bits: int, group_size: int,
                api_key: str | None, threads: int | None, extra: list[str]) -> None:
    """Check everything, convert if needed, then become vLLM's server (never returns)."""
    from riverllm.vllm_plugin.offline import dense_architecture

    check_vllm_installed()
    Method.parse(method, bits)  # a typo fails before any conversion
    environment = server_environment(threads)
    model_dir = model_directory(model)
    overrides = hf_overrides(dense_architecture(model_dir), method, tau, bits, group_size)
    command = server_command(model_dir, host, port, overrides, model, api_key, extra)
    print(f"riverllm: starting vLLM: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execve(command[0], command, environment)
