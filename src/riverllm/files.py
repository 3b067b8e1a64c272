"""Writing files so that a reader never sees half of one: the one atomic writer of riverllm.

Everything riverllm writes (reports, caches, profiles, plots, rivers) goes through a temp file in
the target's own folder, renamed into place with `os.replace` (atomic on POSIX). An interrupted
run leaves the old file or none, never a torn one. Files get the ordinary mode of the user's
umask (mkstemp would make them private: a shared cache must be readable like any other).
"""

from __future__ import annotations

import os
import tempfile
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
