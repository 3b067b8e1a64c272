"""River's settings for a model served by vLLM: where tau, bits and group size come from.

Highest priority first:
1. keys in the model config, which `hf_overrides` sets: `river_tau`, `river_bits`,
   `river_group_size`, `river_min_exit_layer`;
2. a riverllm config file (JSON with the keys `tau`, `bits`, `group_size`, `min_exit_layer`) named by
   `river_config` in the model config or by the environment variable RIVERLLM_VLLM_CONFIG;
3. the tau that `riverllm calibrate` stored for the model (src/riverllm/profiles.py), looked up
   under the packaged name the converted directory records (`riverllm_source` in config.json,
   written by `riverllm.vllm_plugin.convert`), else under the directory's own path;
4. riverllm's per-family default (policy.DEFAULT_TAU).

No vLLM import: this module is tested in the main environment.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riverllm.errors import RiverError
from riverllm.policy import DEFAULT_TAU, FALLBACK_TAU, ExitPolicy, check_tau
from riverllm.profiles import load_profile_taus

CONFIG_ENV = "RIVERLLM_VLLM_CONFIG"
FILE_KEYS = ("tau", "bits", "group_size", "min_exit_layer")


@dataclass(frozen=True)
class RiverSettings:
    tau: float
    bits: int = 4
    group_size: int = 64
    min_exit_layer: int = 1
    tau_source: str = "default"  # where tau came from, logged at start (hf_overrides | file | profile | default)

    def policy(self) -> ExitPolicy:
        # A cosine never exceeds 1, so tau > 1 never exits: as inf, no similarity is even computed
        # (JSON, and so hf_overrides, cannot spell inf; users write 2).
        return ExitPolicy(tau=math.inf if self.tau > 1 else self.tau, min_exit_layer=self.min_exit_layer)


def _read_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RiverError(f"cannot read the riverllm config file {path}: {error}") from None
    if not isinstance(data, dict) or set(data) - set(FILE_KEYS):
        raise RiverError(f"{path}: a riverllm config file is a JSON object with keys among {', '.join(FILE_KEYS)}")
    return data


def _profile_tau(config: Any, model_path: str | None, bits: int, group_size: int) -> float | None:
    names = [getattr(config, "riverllm_source", None), model_path]
    for name in filter(None, names):
        tau = load_profile_taus(str(name), group_size).get(bits)
        if tau is not None:
            return tau
    return None


def resolve_settings(config: Any, model_path: str | None = None) -> RiverSettings:
    """RiverSettings for a HF config object (attributes as `hf_overrides` leaves them)."""
    file_path = getattr(config, "river_config", None) or os.environ.get(CONFIG_ENV)
    from_file = _read_file(file_path) if file_path else {}

    def pick(key: str, default: Any) -> Any:
        value = getattr(config, f"river_{key}", None)
        return from_file.get(key, default) if value is None else value

    bits, group_size = int(pick("bits", 4)), int(pick("group_size", 64))
    min_exit_layer = int(pick("min_exit_layer", 1))
    if bits not in (2, 3, 4, 8):
        raise RiverError(f"river_bits must be one of 2, 3, 4, 8, got {bits}")
    if group_size not in (16, 32, 64, 128, 256):
        raise RiverError(f"river_group_size must be one of 16, 32, 64, 128, 256, got {group_size}")

    if getattr(config, "river_tau", None) is not None:
        tau, source = float(config.river_tau), "hf_overrides"
    elif "tau" in from_file:
        tau, source = float(from_file["tau"]), f"file {file_path}"
    elif (calibrated := _profile_tau(config, model_path, bits, group_size)) is not None:
        tau, source = calibrated, "calibration profile"
    else:
        tau, source = DEFAULT_TAU.get(getattr(config, "model_type", ""), FALLBACK_TAU), "default"
    if not (math.isinf(tau) and tau > 0):
        check_tau(tau)
    return RiverSettings(tau=tau, bits=bits, group_size=group_size, min_exit_layer=min_exit_layer, tau_source=source)
