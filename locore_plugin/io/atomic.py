"""Writes that survive interruption: a reader sees the old file or the whole new one, never half."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, Path], payload: Union[bytes, str]) -> Path:
    """Write ``payload`` to a temporary sibling, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload.encode() if isinstance(payload, str) else payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def set_aside(path: Union[str, Path], error: BaseException) -> Path:
    """Move an unreadable cache entry out of the way (``NAME.corrupt``, never deleted) and say so
    on stderr, naming the file and why, so the caller can treat it as missing and recompute.
    A truncated file (a full disk, a killed copy) then costs a recomputation, not the run."""
    import sys

    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process (a data-parallel rank) set it aside first
        pass
    print(f"locore-plugin: {path} is unreadable ({type(error).__name__}: {error}); set aside as {aside.name}, "
          "recomputing it", file=sys.stderr)
    return aside
