"""Files a user keeps are never half-written: everything goes to a temporary file (or folder)
beside the target, is flushed to disk, and takes the final name in one rename."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary path)`, then rename it to `path`. On any failure (an interrupt
    included) the temporary file is removed and an existing `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        # A file made by open() has the permissions the user's umask gives; some writers
        # (safetensors) create 0600 files that other users of a shared ComfyUI could not read.
        open(temp, "xb").close()
        mode = temp.stat().st_mode & 0o777
        write(temp)
        os.chmod(temp, mode)
        _fsync(temp)  # on disk before it takes the final name
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, data: object) -> Path:
    return write_text_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def make_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` and check a file can be written in it, before hours of work depend on it;
    PVAError naming `what` (the input) otherwise."""
    from .errors import PVAError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise PVAError(
            f"{what}: cannot write to {folder} ({error.strerror}); choose a folder you can write to."
        ) from None
    return folder


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the header's metadata in sorted order: the same tensors and
    metadata give the same bytes in every process (safetensors orders metadata by a hash that is
    seeded anew in each process)."""
    import struct

    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata)
    if not metadata:
        return
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
        data = f.read()
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)
