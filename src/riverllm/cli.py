"""The `riverllm` command. Each subcommand parses its flags, calls the library, and prints.

User mistakes arrive here as `RiverError`s and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from riverllm.errors import RiverError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="River-LLM: training-free token-level early exit for decoder-only LLMs.")

MODEL_HELP = "packaged name (see `riverllm models`), a HuggingFace model directory, or a .gguf file"
ModelOption = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP)
DeviceOption = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_lm(model: str, device: Optional[str], bits: int = 4, group_size: int = 64, quiet: bool = False):
    import riverllm

    return riverllm.load(model, device=device, bits=bits, group_size=group_size, progress=not quiet)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt text"),
    model: str = ModelOption,
    method: str = typer.Option("river", help="dense | w4 | river (also w3, river3, river:0.9 ...)"),
    tau: Optional[float] = typer.Option(None, help="exit threshold on cos(h_{l-1}, h_l); default per model"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 is off"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    raw: bool = typer.Option(False, "--raw", help="feed the prompt as is, no chat template"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    bits: int = typer.Option(4, help="river bit width: 2, 3, 4 or 8"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size"),
    min_exit_layer: int = typer.Option(1, "--min-exit-layer", help="exits allowed only after deeper layers"),
    max_backbone_layers: Optional[int] = typer.Option(None, "--max-backbone-layers",
                                                      help="force the exit here at the latest"),
    device: Optional[str] = DeviceOption,
) -> None:
    """Generate text with River-LLM (or the dense / w4 baselines)."""
    lm = load_lm(model, device, bits, group_size, quiet=as_json)
    options = dict(method=method, tau=tau, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=seed, stop=stop, raw=raw, bits=bits, min_exit_layer=min_exit_layer,
                   max_backbone_layers=max_backbone_layers)
    if as_json:
        result = lm.generate(prompt, **options)
        typer.echo(json.dumps({"model": model, **result.to_dict()}))
        return
    result = None
    for event in lm.stream(prompt, **options):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        result = event.result or result
    sys.stdout.write("\n")
    typer.echo(result.summary(), err=True)


@app.command()
def chat(
    model: str = ModelOption,
    method: str = typer.Option("river"),
    tau: Optional[float] = typer.Option(None),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0),
    device: Optional[str] = DeviceOption,
) -> None:
    """Chat interactively (streaming). Type /exit or Ctrl-D to leave, /reset to forget."""
    lm = load_lm(model, device)
    messages: list[dict] = []
    typer.echo(f"chatting with {model} ({method}); /exit to leave, /reset to start over", err=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            typer.echo("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("river> ")
        result = None
        for event in lm.stream(messages, method=method, tau=tau, max_new_tokens=max_new_tokens,
                               temperature=temperature):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            result = event.result or result
        sys.stdout.write("\n")
        typer.echo(f"[{result.summary()}]", err=True)
        messages.append({"role": "assistant", "content": result.text})


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the packaged models, their size and whether they are installed."""
    from riverllm.loading import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "model", "size", "installed")
    for row in rows:
        table.add_row(row["name"], row["title"], f"{row['size_bytes'] / 1e6:.0f} MB", "yes" if row["installed"] else "no")
    Console().print(table)


@app.command()
def inspect(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    model: str = ModelOption,
    raw: bool = typer.Option(False, "--raw"),
    tau: Optional[float] = typer.Option(None, help="highlight similarities above this"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a heat-map PNG here"),
    as_json: bool = typer.Option(False, "--json"),
    device: Optional[str] = DeviceOption,
) -> None:
    """Show the state transition similarity s_l = cos(h_{l-1}, h_l) of each prompt token at each layer."""
    from riverllm.inspect import similarity_table, write_heatmap

    lm = load_lm(model, device, quiet=as_json)
    report = similarity_table(lm, prompt, raw=raw, tau=tau)
    if plot is not None:
        write_heatmap(report, plot)
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    threshold = report["tau"]
    table = Table("token", *[str(layer) for layer in range(1, report["num_layers"] + 1)], "exit",
                  title=f"s_l per token and layer (bold: > tau = {threshold:g})")
    for token, row, exit_layer in zip(report["tokens"], report["similarities"], report["exit_layers"]):
        cells = [f"[bold]{s:.2f}[/bold]" if s > threshold else f"{s:.2f}" for s in row]
        table.add_row(repr(token), *cells, str(exit_layer))
    Console().print(table)
    if plot is not None:
        typer.echo(f"heat-map written to {plot}", err=True)


def main() -> None:
    try:
        app()
    except RiverError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
