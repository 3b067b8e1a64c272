"""Calibrated tau profiles: where `riverllm calibrate` keeps its results and `riverllm.load` finds them.

Profiles are JSON files in `cache_dir()/profiles/` (RIVERLLM_CACHE moves them), one per model,
one entry per bit width and group size, each recording the tau, the target, the text, the
measurement, the date and the riverllm version. They are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from riverllm.errors import RiverError
from riverllm.files import write_text_atomic

PROFILE_FORMAT = 1


def profiles_dir() -> Path:
    from riverllm.loading import cache_dir

    return cache_dir() / "profiles"


def profile_path(model: str) -> Path:
    """profiles_dir()/<model>.json. A packaged name is used as is; a path is reduced to its file
    name plus a hash of its absolute location, so two models in different folders with the same
    file name keep separate profiles."""
    path = Path(model).expanduser()
    if path.exists():
        resolved = str(path.resolve())
        name = f"{path.resolve().name}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"
    else:
        name = model
    return profiles_dir() / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") + ".json")


def entry_key(bits: int, group_size: int, kind: str = "river") -> str:
    """River entries are "4bit-g64"; lossless (speed-calibrated) ones "lossless-4bit-g64"."""
    return f"{bits}bit-g{group_size}" if kind == "river" else f"{kind}-{bits}bit-g{group_size}"


# What every entry must hold for a load to use it (calibrate writes more, for people to read).
REQUIRED_FIELDS = {"bits": int, "group_size": int, "tau": (int, float)}


def read_profile(model: str) -> dict:
    """The model's profile ({} when it has none). A file that is not a profile is an error, not
    something to silently ignore: the user then runs with another tau than they calibrated."""
    path = profile_path(model)
    if not path.exists():
        return {}
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(profile, dict) or not isinstance(profile.get("entries", {}), dict):
            raise ValueError("not a riverllm profile")
        for key, entry in profile.get("entries", {}).items():
            for field, kinds in REQUIRED_FIELDS.items():
                value = entry.get(field) if isinstance(entry, dict) else None
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise ValueError(f"entry {key!r} has no valid field {field!r}")
    except (OSError, ValueError) as error:
        raise RiverError(f"the calibration profile {path} is unreadable ({error}); "
                         "delete it or run `riverllm calibrate` again") from None
    return profile


def load_profile_taus(model: str, group_size: int) -> dict[int, float]:
    """{bits: tau} calibrated for this model at this group size (RiverLM.load reads it)."""
    taus = {}
    for entry in read_profile(model).get("entries", {}).values():
        if entry.get("kind", "river") == "river" and entry.get("group_size") == group_size:
            taus[int(entry["bits"])] = float(entry["tau"])
    return taus


def load_lossless_profile(model: str, group_size: int) -> dict[int, tuple[float, int]]:
    """{bits: (tau, draft tokens)} that `riverllm calibrate --target speed` measured fastest."""
    found = {}
    for entry in read_profile(model).get("entries", {}).values():
        if entry.get("kind") == "lossless" and entry.get("group_size") == group_size:
            drafts = entry.get("draft_tokens")
            if isinstance(drafts, int) and not isinstance(drafts, bool) and drafts >= 1:
                found[int(entry["bits"])] = (float(entry["tau"]), drafts)
    return found


def write_profile_entry(model: str, entry: dict) -> Path:
    """Add or replace the entry for entry["bits"], entry["group_size"] (and entry["kind"]); atomically."""
    path = profile_path(model)
    profile = read_profile(model) or {"format": PROFILE_FORMAT, "model": model, "entries": {}}
    profile["entries"][entry_key(entry["bits"], entry["group_size"], entry.get("kind", "river"))] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(profile, indent=2) + "\n")
    return path
