"""The backbone cache: a GGUF is converted once, and loaded from safetensors after that.

transformers turns a GGUF into a model by dequantizing every tensor in numpy and building a fast
tokenizer from the GGUF's vocabulary: 45-65 s for Qwen2.5-Coder-0.5B on a 2-core CPU, on every
run. The result is kept in `cache_dir()/backbones/NAME-DTYPE/` as an ordinary Hugging Face model
folder (`model.safetensors` in the model's dtype, config, generation config, tokenizer), which
transformers memory-maps on the next load.

An entry is trusted only if its manifest (`riverllm-cache.json`, written last) matches all of:

* the source file's checksum: the pinned sha256 of a packaged model (verified when it was
  assembled), else the xxh3-128 of the .gguf's bytes (xxh3 reads several GB/s; sha256 here 0.5);
* the dtype, the riverllm version, the transformers version (a conversion or save format change
  in either would otherwise be served stale), and this module's entry format;
* the size and xxh3-128 of every file in the folder (a truncated or edited file is caught;
  hashing the 2 GB float32 Qwen-0.5B entry takes about 0.3 s).

Anything else is reported in one line on stderr, removed and rebuilt from the source: an entry is
never used silently when it may be wrong. Entries are written with `files.write_dir_atomic`, so
a killed run leaves the old entry or none. A cache that cannot be written (disk full, read-only)
costs the speed-up, not the run.

Each entry also records the fingerprint under which `build_river` caches this backbone's rivers
(`cache_dir()/rivers/FINGERPRINT-bB-gG.safetensors`), so that `riverllm models` can show them and
`riverllm cache clear MODEL` can remove them with it.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from riverllm.files import remove_stale_temps, write_dir_atomic, write_text_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ENTRY_FORMAT = 1  # bump when what an entry holds changes
MANIFEST = "riverllm-cache.json"
_BLOCK = 16 << 20


def backbones_dir() -> Path:
    from riverllm.loading import cache_dir

    return cache_dir() / "backbones"


def rivers_dir() -> Path:
    from riverllm.loading import cache_dir

    return cache_dir() / "rivers"


def xxh3_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in blocks (a multi-GB file never sits in memory twice)."""
    import xxhash

    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BackboneKey:
    """What a cached backbone was made from and by; an entry is used only when all of it matches."""

    label: str  # packaged name, or the .gguf's stem plus a hash of its absolute path
    source: str  # absolute path of the .gguf it was converted from (for `riverllm models`)
    source_checksum: str  # "sha256:..." (packaged, pinned) or "xxh3_128:..." (any other .gguf)
    dtype: str
    riverllm_version: str
    transformers_version: str
    entry_format: int = ENTRY_FORMAT

    @property
    def entry_dir(self) -> Path:
        return backbones_dir() / f"{self.label}-{self.dtype}"

    def differences(self, other: dict[str, Any]) -> list[str]:
        """The fields in which a manifest's key `other` differs from this one. Not the source's
        path: the checksum says whether it is the same file, wherever it now lies."""
        return [name for name, value in asdict(self).items() if name != "source" and other.get(name) != value]


def backbone_key(source: Path, dtype: torch.dtype, packaged_name: str | None = None,
                 packaged_sha256: str | None = None) -> BackboneKey:
    import transformers

    import riverllm
    import xxhash

    source = source.resolve()
    if packaged_name is not None and packaged_sha256 is not None:
        label, checksum = packaged_name, f"sha256:{packaged_sha256}"
    else:
        # Two different files may share a name: the path's hash keeps their entries apart, and
        # the content checksum in the key catches a file replaced at the same path.
        label = f"{source.stem}-{xxhash.xxh3_64(str(source).encode()).hexdigest()[:8]}"
        checksum = f"xxh3_128:{xxh3_file(source)}"
    return BackboneKey(label=label, source=str(source), source_checksum=checksum, dtype=dtype_name(dtype),
                       riverllm_version=riverllm.__version__, transformers_version=transformers.__version__)


def _warn(message: str) -> None:
    print(f"riverllm: {message}", file=sys.stderr, flush=True)


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


def entry_problem(entry: Path, key: BackboneKey) -> str | None:
    """Why the entry at `entry` must not be used for `key` (None: it is sound and matches)."""
    manifest = _read_manifest(entry)
    if manifest is None:
        return "its manifest is missing or unreadable"
    changed = key.differences(manifest.get("key") or {})
    if changed:
        return f"it was made with a different {', '.join(changed)}"
    files = manifest.get("files") or {}
    present = {p.name for p in entry.iterdir() if p.name != MANIFEST}
    if not files or present != set(files):
        return "its files are not the ones its manifest lists"
    for name, expected in files.items():
        path = entry / name
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size} bytes, not {expected.get('size')}"
        if xxh3_file(path) != expected.get("xxh3_128"):
            return f"{name} does not match its checksum"
    return None


def open_entry(key: BackboneKey) -> Path | None:
    """The verified entry folder for `key`, or None. A damaged or outdated entry is removed (and
    said so on stderr), so that the caller rebuilds it."""
    entry = key.entry_dir
    if not entry.is_dir():
        return None
    try:
        problem = entry_problem(entry, key)
    except OSError as error:
        problem = f"it cannot be read ({error})"
    if problem is None:
        return entry
    _warn(f"cached backbone {entry} is not usable ({problem}); rebuilding it from {key.source}")
    shutil.rmtree(entry, ignore_errors=True)
    return None


def store_entry(key: BackboneKey, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                river_fingerprint: str, progress: bool = True) -> Path | None:
    """Save `model` and `tokenizer` as the entry for `key` (atomically). Returns the entry, or None
    when it could not be written: the caller goes on with the model it has."""
    entry = key.entry_dir

    def fill(folder: Path) -> None:
        from safetensors.torch import save_model

        # Not `model.save_pretrained`: a model loaded from a GGUF carries transformers' GGUF
        # quantizer, which refuses to serialize, although its weights are plain dequantized tensors.
        # safetensors' `save_model` writes them (a tied LM head once), and the config without the
        # GGUF quantization entry makes the folder an ordinary model folder.
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(folder)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        files = {path.name: {"size": path.stat().st_size, "xxh3_128": xxh3_file(path)}
                 for path in sorted(folder.iterdir())}
        manifest = {"key": asdict(key), "files": files, "river_fingerprint": river_fingerprint}
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    try:
        remove_stale_temps(entry.parent, f".{entry.name}.", older_than_s=3600)
        if progress:
            _warn(f"caching the converted backbone in {entry} (next runs load it in seconds)")
        return write_dir_atomic(entry, fill)
    except OSError as error:
        _warn(f"could not cache the converted backbone in {entry} ({error}); the next run converts it again")
        return None


# --- what is cached, for `riverllm models` and `riverllm cache clear` -------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def river_files(fingerprint: str | None) -> list[Path]:
    if not fingerprint or not rivers_dir().is_dir():
        return []
    return sorted(rivers_dir().glob(f"{fingerprint}-b*-g*.*"))  # .safetensors (and older .pt)


def list_entries() -> list[dict[str, Any]]:
    """One row per cached backbone: label, dtype, source, bytes, and the rivers built from it."""
    rows = []
    if not backbones_dir().is_dir():
        return rows
    for entry in sorted(backbones_dir().iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        manifest = _read_manifest(entry) or {}
        key = manifest.get("key") or {}
        rivers = river_files(manifest.get("river_fingerprint"))
        rows.append({
            "label": key.get("label", entry.name), "dtype": key.get("dtype", "?"), "source": key.get("source", "?"),
            "path": str(entry), "bytes": _folder_bytes(entry),
            "rivers": [river.name for river in rivers], "river_bytes": sum(r.stat().st_size for r in rivers),
        })
    return rows


def clear(model: str | None = None) -> list[Path]:
    """Remove cached backbones (all, or those of `model`: a packaged name or a .gguf path) and the
    rivers built from them; with no model, every river too. Returns what was removed."""
    removed: list[Path] = []
    for row in list_entries():
        if model is not None and model != row["label"] and not _same_file(model, row["source"]):
            continue
        for river in river_files((_read_manifest(Path(row["path"])) or {}).get("river_fingerprint")):
            river.unlink(missing_ok=True)
            removed.append(river)
        shutil.rmtree(row["path"], ignore_errors=True)
        removed.append(Path(row["path"]))
    if model is None and rivers_dir().is_dir():
        for river in sorted(rivers_dir().iterdir()):
            if river.is_file():
                river.unlink(missing_ok=True)
                removed.append(river)
    return removed


def _same_file(spec: str, source: str) -> bool:
    try:
        return Path(spec).expanduser().resolve() == Path(source)
    except OSError:
        return False
