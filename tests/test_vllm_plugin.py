"""The parts of the vLLM plugin that need no vLLM: settings, twins, the token router, the server
command. They run in the main suite; tests/test_vllm_engine.py runs River inside vLLM itself."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from riverllm.errors import RiverError
from riverllm.profiles import write_profile_entry
from riverllm.river.quant import QuantLinear
from riverllm.vllm_plugin.settings import CONFIG_ENV, resolve_settings
from riverllm.vllm_plugin.serve import hf_overrides, server_command
from riverllm.vllm_plugin.twin import RiverRows, SplitLinear, quantize_parts, twin_state

SRC = Path(__file__).resolve().parents[1] / "src"


def config(**attributes):
    return SimpleNamespace(model_type="llama", **attributes)


# --- settings: hf_overrides > config file > calibration profile > default ------------------------


def test_settings_priority(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert resolve_settings(config()).tau_source == "default"

    write_profile_entry("smollm2-135m", {"bits": 4, "group_size": 64, "tau": 0.87})
    from_profile = resolve_settings(config(riverllm_source="smollm2-135m"))
    assert (from_profile.tau, from_profile.tau_source) == (0.87, "calibration profile")
    assert resolve_settings(config(riverllm_source="smollm2-135m", river_bits=3)).tau_source == "default"

    file = tmp_path / "river.json"
    file.write_text(json.dumps({"tau": 0.8, "bits": 3}))
    monkeypatch.setenv(CONFIG_ENV, str(file))
    from_file = resolve_settings(config(riverllm_source="smollm2-135m"))
    assert (from_file.tau, from_file.bits) == (0.8, 3) and from_file.tau_source.startswith("file")

    overridden = resolve_settings(config(riverllm_source="smollm2-135m", river_tau=0.95, river_bits=4))
    assert (overridden.tau, overridden.bits, overridden.tau_source) == (0.95, 4, "hf_overrides")


def test_settings_tau_above_one_never_computes_similarity():
    policy = resolve_settings(config(river_tau=2.0)).policy()
    assert policy.tau == math.inf and not policy.needs_similarity


@pytest.mark.parametrize("attributes, message", [
    ({"river_bits": 5}, "river_bits must be one of"),
    ({"river_group_size": 48}, "river_group_size must be one of"),
    ({"river_tau": 50.0}, "tau must lie in"),
])
def test_settings_reject_bad_values(attributes, message):
    with pytest.raises(RiverError, match=message):
        resolve_settings(config(**attributes))


def test_settings_reject_bad_config_file(tmp_path):
    file = tmp_path / "river.json"
    file.write_text(json.dumps({"tau": 0.9, "threshold": 1}))
    with pytest.raises(RiverError, match="keys among"):
        resolve_settings(config(river_config=str(file)))
    with pytest.raises(RiverError, match="cannot read"):
        resolve_settings(config(river_config=str(tmp_path / "missing.json")))


# --- twins: a fused vLLM matrix gets the twins riverllm gives its separate parts -----------------


def fused_linear(sizes: list[int], in_features: int, bias: bool) -> nn.Module:
    """What a loaded vLLM QKVParallelLinear looks like to the plugin: a weight, a bias, part sizes."""
    torch.manual_seed(0)
    layer = nn.Linear(in_features, sum(sizes), bias=bias)
    layer.output_partition_sizes = sizes
    return layer


def test_fused_twin_equals_riverllm_twins_of_the_parts():
    sizes = [128, 64, 64]  # q, k, v
    fused = fused_linear(sizes, 128, bias=True)
    twin = quantize_parts(fused, bits=4, group_size=64)
    x = torch.randn(5, 128)
    separate, start = [], 0
    for size in sizes:
        part = nn.Linear(128, size)
        part.weight.data, part.bias.data = fused.weight[start:start + size].clone(), fused.bias[start:start + size].clone()
        separate.append(QuantLinear(part, bits=4, group_size=64)(x))
        start += size
    assert torch.equal(twin(x), torch.cat(separate, dim=-1))
    # The cached codes rebuild the very same twin without running HQQ again.
    assert torch.equal(quantize_parts(fused, 4, 64, saved=twin_state(twin))(x), twin(x))


class VllmStyleLinear(nn.Module):
    """A vLLM linear layer's calling convention: returns (output, output_bias)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.weight = linear.weight
        self.bias = linear.bias
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.linear(x), None


def test_split_linear_routes_each_token():
    torch.manual_seed(1)
    backbone = VllmStyleLinear(nn.Linear(64, 32))
    twin = quantize_parts(backbone, bits=4, group_size=64)
    rows = RiverRows()
    split = SplitLinear(backbone, twin, rows)
    x = torch.randn(6, 64)
    dense, river = backbone.linear(x), twin(x)
    assert not torch.equal(dense, river)

    assert torch.equal(split(x)[0], dense)  # no mask: everything on the backbone
    rows.set(torch.tensor([False, True, False, True, True, False]))
    out = split(x)[0]
    assert torch.equal(out[rows.mask], twin(x[rows.mask])) and torch.equal(out[~rows.mask], backbone.linear(x[~rows.mask]))
    assert backbone.calls[-1] == 3  # the backbone only saw the tokens still in it
    rows.set(torch.ones(6, dtype=torch.bool))
    calls = len(backbone.calls)
    assert torch.equal(split(x)[0], river) and len(backbone.calls) == calls  # all exited: backbone not run


# --- serve --engine vllm --------------------------------------------------------------------------


def test_server_command_selects_river():
    overrides = hf_overrides("Qwen2ForCausalLM", "river:0.93", None, 4, 64)
    assert overrides == {"architectures": ["RiverQwen2ForCausalLM"], "river_bits": 4, "river_group_size": 64,
                         "river_tau": 0.93}
    assert hf_overrides("LlamaForCausalLM", "river", 0.8, 4, 64)["river_tau"] == 0.8
    assert "river_tau" not in hf_overrides("LlamaForCausalLM", "river", None, 4, 64)  # profile / default decide
    assert hf_overrides("LlamaForCausalLM", "dense", None, 4, 64) == {}
    command = server_command(Path("/m"), "127.0.0.1", 8000, overrides, "qwen", extra=["--max-num-seqs", "32"])
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in command
    assert json.loads(command[command.index("--hf-overrides") + 1]) == overrides
    assert command[-2:] == ["--max-num-seqs", "32"] and "--no-enable-prefix-caching" in command
    assert "--no-enable-prefix-caching" not in server_command(Path("/m"), "h", 1, {}, "q")  # dense keeps vLLM's default


@pytest.mark.parametrize("method, tau, message", [
    ("w4", None, "dense or river"), ("mask:0.9", None, "dense or river"), ("dense", 0.9, "never exits"),
])
def test_server_refuses_what_vllm_cannot_serve(method, tau, message):
    with pytest.raises(RiverError, match=message):
        hf_overrides("LlamaForCausalLM", method, tau, 4, 64)
    with pytest.raises(RiverError, match="no River variant"):
        hf_overrides("GemmaForCausalLM", "river", None, 4, 64)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "riverllm.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_cli_serve_vllm_refuses_riverllm_only_flags():
    result = run_cli("serve", "--engine", "vllm", "--max-queue", "3")
    assert result.returncode == 2 and result.stderr.startswith("error: --max-queue") and "Traceback" not in result.stderr
    result = run_cli("serve", "--engine", "tgi")
    assert result.returncode == 2 and "--engine must be riverllm or vllm" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_cli_serve_vllm_without_vllm_is_one_line():
    result = run_cli("serve", "--engine", "vllm")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "vLLM is not installed" in result.stderr
