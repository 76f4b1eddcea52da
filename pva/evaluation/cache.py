"""The run folder: settings, generated pictures, personalized models, reports. Every file is
written atomically, so a stopped run resumes from what is there."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch
from PIL import Image

from ..data.photos import read_photo
from ..errors import PVAError
from ..files import write_atomically, write_json_atomically

SETTINGS_FILE = "run.json"


def slug(text: str) -> str:
    """A file-name-safe form of a name or a prompt."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "x"


def job_seed(seed: int, *parts: str) -> int:
    """The sampling seed of one picture: the same for every method (so methods differ only by
    PVA) and however identities are shared among processes."""
    return zlib.crc32("/".join((str(seed), *parts)).encode()) & 0xFFFFFFFF


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- the run's identity ------------------------------------------------------------------
    def claim(self, key: dict) -> None:
        """Start a run here, or resume one made with exactly the same generation settings."""
        path = self.root / SETTINGS_FILE
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise PVAError(
                    f"output folder {self.root}: {SETTINGS_FILE} is unreadable ({error})."
                ) from None
            if existing != key:
                old, new = _flat(existing), _flat(key)
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise PVAError(
                    f"output folder {self.root} holds a run made with other settings ({', '.join(changed)} differ); "
                    "its pictures would mix with this run's. Use another output folder, or delete that one."
                )
            return
        write_json_atomically(path, key)

    # -- pictures ----------------------------------------------------------------------------
    def picture(self, kind: str, method: str, person: str, photo_key: str, variant: str) -> Path:
        stem = slug(Path(photo_key).stem)
        return self.root / kind / method / slug(person) / f"{stem}.{slug(variant)}.png"

    def save_picture(self, path: Path, pixels: torch.Tensor) -> None:
        array = (pixels.clamp(0, 1) * 255).round().byte().cpu().numpy()
        write_atomically(path, lambda temp: Image.fromarray(array).save(temp, format="PNG"))

    @staticmethod
    def load_picture(path: Path) -> torch.Tensor:
        return read_photo(path, "picture of the run folder")

    def ground_truth(self, person: str, photo_key: str) -> Path:
        """The target at the working resolution: what results are compared with."""
        return self.picture("inputs", "ground-truth", person, photo_key, "photo")

    def mask(self, person: str, photo_key: str, mask_type: str) -> Path:
        return self.picture("inputs", "masks", person, photo_key, mask_type)

    def person_record(self, person: str) -> Path:
        """Written when all of a person's pictures exist: the targets used and those skipped."""
        return self.root / "people" / f"{slug(person)}.json"

    # -- personalized models -----------------------------------------------------------------
    def personalized(self, person: str) -> Path:
        return self.root / "personalized" / f"{slug(person)}.safetensors"

    def personalization_record(self, person: str) -> Path:
        return self.root / "personalized" / f"{slug(person)}.json"


def _flat(data: dict, prefix: str = "") -> dict:
    """{"settings": {"steps": 2}} -> {"steps": 2}: the names a user knows."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("settings", "models"):
            out.update(_flat(value))
        else:
            out[prefix + key] = value
    return out
