"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it.
A run stopped half-way (or two processes writing) never leaves a half-written file under the
final name, so caches and reports can be trusted by whoever reads them next."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(temporary_path)` writes the content; it then takes `path`'s name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        # A file made by open() has the permissions the user's umask gives; some writers
        # (safetensors) make 0600 files, which other users of a shared ComfyUI could not read.
        open(temp, "xb").close()
        mode = temp.stat().st_mode & 0o777
        write(temp)
        os.chmod(temp, mode)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())  # on disk before it takes the final name
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
