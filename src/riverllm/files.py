"""Writing files so that a reader never sees half of one: the one atomic writer of riverllm.

Everything riverllm writes (reports, caches, profiles, plots, rivers) goes through a temp file in
the target's own folder, renamed into place with `os.replace` (atomic on POSIX). An interrupted
run leaves the old file or none, never a torn one. A folder that is one unit (a cached backbone:
weights, config and tokenizer) is filled under a temp name and renamed into place the same way. Files get the ordinary mode of the user's
umask (mkstemp would make them private: a shared cache must be readable like any other).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path | str, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) to fill a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_atomic(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    return write_atomic(path, lambda temp: Path(temp).write_bytes(data))


def write_dir_atomic(path: Path | str, fill: Callable[[Path], None]) -> Path:
    """Call fill(temp_dir) to fill a temp folder beside `path`, then rename it into place.

    A folder cannot be renamed over a non-empty one, so an existing `path` is first renamed aside
    and removed afterwards: a reader sees the old folder, then briefly none, then the new one,
    never a mix of the two."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    aside: Path | None = None
    try:
        fill(temp)
        # Some writers (safetensors) make private files; a cache is readable like any other file.
        for written in temp.rglob("*"):
            os.chmod(written, (0o777 if written.is_dir() else 0o666) & ~_umask())
        os.chmod(temp, 0o777 & ~_umask())
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, aside)  # replaces the empty folder mkdtemp made
        os.replace(temp, path)
    finally:
        for leftover in (temp, aside):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return path


def remove_stale_temps(directory: Path, prefix: str, older_than_s: float = 60.0) -> None:
    """Remove temp files and folders (named `prefix`...) that a killed writer left behind: they can
    be gigabytes. One touched within `older_than_s` may belong to a writer still at work, so it
    is left alone."""
    for stale in directory.glob(prefix + "*"):
        try:
            if time.time() - stale.stat().st_mtime <= older_than_s:
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        except OSError:
            pass
