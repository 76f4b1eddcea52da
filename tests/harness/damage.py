"""Damaged files for the tests of what reads them: a pickle that would run code, a truncated copy."""

import os
import pickle
from pathlib import Path

import torch


class Payload:
    """What an attacker's pickle would run on loading: it must never run."""

    def __reduce__(self):
        return (Path(os.environ.get("PVA_PAYLOAD_FLAG", "/nonexistent/flag")).touch, ())


def pickle_at(path: Path, flag: Path) -> None:
    os.environ["PVA_PAYLOAD_FLAG"] = str(flag)
    path.write_bytes(pickle.dumps({"tensor": Payload()}))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def checkpoint_files(content: str) -> dict:
    """Writers of a checkpoint's required files whose content says which checkpoint they are."""

    def write(path: Path) -> None:
        if path.name == "state.pt":
            torch.save({"format": 1, "step": 1, "content": content}, path)
        else:
            path.write_text(content)

    return {"pva.safetensors": write, "state.pt": write}
