"""Pretraining checkpoints: one folder per saved step, complete or absent.

    <output>/checkpoints/step-0001000/pva.safetensors      the PVA model (EMA weights when EMA is on);
                                                           load it with Load PVA Model
                                    pva-raw.safetensors  the trained weights, when EMA is on
                                    facenet.safetensors  stage 2: the fine-tuned FaceNet
                                    state.pt             optimizer, schedule, EMA, step, history
                                                         (tensors and plain values only: read
                                                         with torch.load(weights_only=True))
                                    meta.json            step, time, provenance
    <output>/checkpoints/latest.json                     the newest complete checkpoint

A folder is written under a temporary name and takes its final name only when complete; latest.json
moves to it afterwards. A run resumed from an earlier checkpoint writes steps that exist already:
the new folder and the old one swap names in one atomic exchange (Linux renameat2), so the name
always holds a complete checkpoint; where the file system cannot exchange, the old folder is
renamed aside first and `recover` (run when a run starts) puts it back if the run died between
the two renames. Killing the run at any moment leaves a complete checkpoint under every name.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import PVAError
from ..files import write_atomically, write_json_atomically

STATE_FORMAT = 1
FOLDER = "checkpoints"
LATEST = "latest.json"
REQUIRED = ("pva.safetensors", "state.pt", "meta.json")
_NEW, _OLD = ".new", ".old"  # suffixes of a replacement's temporary folders


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / FOLDER / f"step-{step:07d}"


def crash_point(name: str) -> None:
    """Called between the steps of a checkpoint replacement; tests make it kill the process."""


def save_checkpoint(
    output_dir: Path, step: int, files: dict[str, Callable[[Path], None]], meta: dict, keep: int = 3
) -> Path:
    """Write `files` (name -> writer of that file) and meta.json as checkpoint `step`; keep the
    newest `keep` checkpoints (0 keeps all)."""
    final = checkpoint_folder(output_dir, step)
    temp = final.with_name(f".{final.name}-{uuid.uuid4().hex[:8]}{_NEW}")
    temp.mkdir(parents=True)
    try:
        for name, write in files.items():
            write_atomically(temp / name, write)
        write_json_atomically(temp / "meta.json", meta)
        crash_point("written")
        _put_in_place(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    write_json_atomically(Path(output_dir) / FOLDER / LATEST, {"checkpoint": final.name, "step": step})
    crash_point("latest written")
    if keep > 0:
        finished = sorted(p for p in (Path(output_dir) / FOLDER).glob("step-*") if p.is_dir())
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _put_in_place(new: Path, final: Path) -> None:
    """Give the complete folder `new` the name `final`, replacing a folder there."""
    if not final.exists():
        os.replace(new, final)
        crash_point("renamed in")
        return
    if exchange(new, final):  # the name never lacks a complete checkpoint
        crash_point("exchanged")
        shutil.rmtree(new)  # now the old checkpoint
        crash_point("old removed")
        return
    aside = final.with_name(f".{final.name}-{uuid.uuid4().hex[:8]}{_OLD}")
    os.replace(final, aside)
    crash_point("old set aside")  # `recover` puts it back if the run dies here
    os.replace(new, final)
    crash_point("renamed in")
    shutil.rmtree(aside)
    crash_point("old removed")


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths' names atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        error = ctypes.get_errno()
        if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
            return False
        raise OSError(error, os.strerror(error), str(a))
    return True


def recover(output_dir: Path) -> list[str]:
    """Tidy what a killed run left in <output>/checkpoints: an old checkpoint set aside whose
    replacement never took its name goes back; other temporary folders are removed. Returns
    what was done, one line each."""
    folder = Path(output_dir) / FOLDER
    done = []
    if not folder.is_dir():
        return done
    for leftover in sorted(folder.glob(".step-*")):
        name = leftover.name[1:].rsplit("-", 1)[0]
        if leftover.name.endswith(_OLD) and not (folder / name).exists() and _is_complete(leftover):
            os.replace(leftover, folder / name)
            done.append(f"{name}: put back the checkpoint a killed run had set aside")
        elif leftover.name.endswith((_OLD, _NEW)):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"{leftover.name}: removed (left by a killed run)")
    return done


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """`latest` (the newest complete checkpoint in output_dir) or a checkpoint folder's path."""
    if resume == "latest":
        folder = _latest(Path(output_dir) / FOLDER)
    else:
        folder = Path(resume)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PVAError(
            f"{folder}: not a finished pretraining checkpoint ({', '.join(missing)} missing); give a folder "
            "under <output>/checkpoints/ to --resume, or 'latest'."
        )
    meta = folder / "meta.json"
    try:
        step = json.loads(meta.read_text())["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PVAError(
            f"{meta}: damaged ({error}); resume from another checkpoint (--resume <folder>)."
        ) from None
    return folder


def _latest(folder: Path) -> Path:
    """The checkpoint latest.json names; if latest.json is damaged or names an incomplete
    folder, the newest complete checkpoint (latest.json is rewritten to it)."""
    pointer = folder / LATEST
    if not pointer.is_file() and not any(folder.glob("step-*")):
        raise PVAError(f"{pointer}: missing; this output folder has no finished checkpoint to resume.")
    try:
        chosen = folder / json.loads(pointer.read_text())["checkpoint"]
        if _is_complete(chosen):
            return chosen
        problem = f"it names {chosen.name}, which is not a complete checkpoint"
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"damaged ({error})"
    complete = sorted(p for p in folder.glob("step-*") if p.is_dir() and _is_complete(p))
    if not complete:
        raise PVAError(f"{pointer}: {problem}, and no complete checkpoint is left; start a new run.")
    newest = complete[-1]
    print(f"[PVA pretraining] {pointer}: {problem}; resuming from the newest complete one, {newest.name}.")
    write_json_atomically(pointer, {"checkpoint": newest.name, "step": int(newest.name.split("-")[1])})
    return newest


def read_state(folder: Path) -> dict:
    path = folder / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only refuses: objects that could run code
        problem = (
            "it holds Python objects other than tensors and plain values (never loaded: they could run code)"
        )
    except Exception as error:  # a truncated or foreign file
        problem = f"damaged or truncated ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    else:
        problem = None
    if problem:
        raise PVAError(
            f"{path}: cannot be read, {problem}; resume from another checkpoint (--resume <folder>)."
        )
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PVAError(f"{path}: not a training state this pack wrote; resume from another checkpoint.")
    return state
