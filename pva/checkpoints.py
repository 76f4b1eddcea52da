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

A folder is written under a temporary name and renamed when complete; latest.json moves to it
afterwards. Killing the run at any moment leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import PVAError
from .files import write_atomically, write_json_atomically

STATE_FORMAT = 1
FOLDER = "checkpoints"
LATEST = "latest.json"
REQUIRED = ("pva.safetensors", "state.pt", "meta.json")


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / FOLDER / f"step-{step:07d}"


def save_checkpoint(
    output_dir: Path, step: int, files: dict[str, Callable[[Path], None]], meta: dict, keep: int = 3
) -> Path:
    """Write `files` (name -> writer of that file) and meta.json as checkpoint `step`; keep the
    newest `keep` checkpoints (0 keeps all)."""
    final = checkpoint_folder(output_dir, step)
    temp = final.with_name(f".{final.name}-{uuid.uuid4().hex[:8]}.tmp")
    temp.mkdir(parents=True)
    try:
        for name, write in files.items():
            write_atomically(temp / name, write)
        write_json_atomically(temp / "meta.json", meta)
        if final.exists():  # a run restarted from an earlier checkpoint writes this step again
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    write_json_atomically(Path(output_dir) / FOLDER / LATEST, {"checkpoint": final.name, "step": step})
    if keep > 0:
        finished = sorted(p for p in (Path(output_dir) / FOLDER).glob("step-*") if p.is_dir())
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """`latest` (the newest complete checkpoint in output_dir) or a checkpoint folder's path."""
    if resume == "latest":
        pointer = Path(output_dir) / FOLDER / LATEST
        if not pointer.is_file():
            raise PVAError(
                f"--resume latest: {output_dir} has no finished checkpoint yet ({pointer} is missing)."
            )
        try:
            folder = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            raise PVAError(
                f"--resume latest: {pointer} is damaged; give a checkpoint folder instead."
            ) from None
    else:
        folder = Path(resume)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PVAError(
            f"--resume: {folder} is not a finished pretraining checkpoint ({', '.join(missing)} missing). "
            "Give a folder under <output>/checkpoints/, or 'latest'."
        )
    return folder


def read_state(folder: Path) -> dict:
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:
        raise PVAError(f"--resume: {folder / 'state.pt'} cannot be read ({error}).") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PVAError(
            f"--resume: {folder / 'state.pt'} is not a training state this pack wrote; start a new run."
        )
    return state
