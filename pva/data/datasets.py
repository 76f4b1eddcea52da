"""Datasets of people for pretraining and evaluation: read-only views of two on-disk layouts.

folders (this pack's native layout):
    root/<person>/<image>.{jpg,jpeg,png,webp}     photos of one person per folder
    root/<person>/<image>.txt                      optional caption of that photo
    root/split.json                                optional {"train": [...], "val": [...], "test": [...]}
Without split.json the people are split by a seeded shuffle (30% test, 10% val by default, the
research code's fractions): the split is by person, so test people are never trained on.

celebahq-idi (CelebAHQ-IDI as its authors' export script writes it):
    root/IDI/<id>/ref_image/<idx>.jpg              reference photos
    root/IDI/<id>/infer_image/<idx>.jpg            photos to inpaint
    root/IDI/<id>/infer_mask/<idx>_<type>.png      type: wholeface, lowerface, eyebrow, random (1 = inpaint)
    root/annotation/idi-<N>.json (or a file given) {"train_ids": [...], "val_ids": [...], "test_ids": [...],
                                                    "id2image": {id: {"infer": [...], "ref": [...]}}}

Only images, text and JSON are read; nothing from a dataset is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PVAError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = ("train", "val", "test")
LAYOUTS = ("auto", "folders", "celebahq-idi")
# CelebAHQ-IDI's mask types and the pack's facial regions they correspond to.
IDI_MASK_REGIONS = {"wholeface": "whole face", "lowerface": "lower face", "eyebrow": "eyes and brows"}
IDI_MASK_TYPES = (*IDI_MASK_REGIONS, "random")


@dataclass(frozen=True)
class Photo:
    path: Path
    key: str  # the path below the dataset root, e.g. "anna/03.jpg": stable id of the photo
    caption: str | None = None
    masks: Mapping[str, Path] = field(default_factory=dict)  # dataset masks by type (1 = inpaint)
    is_reference: bool = True  # may serve as a reference photo
    is_target: bool = True  # may be the photo that is inpainted

    def read(self, what: str = "photo") -> torch.Tensor:
        """[H, W, 3] float 0..1, upright (EXIF orientation applied)."""
        from .photos import read_photo

        return read_photo(self.path, what)

    def read_mask(self, kind: str, size: tuple[int, int]) -> torch.Tensor:
        """The dataset's mask of this kind, [H, W] 0/1 at the photo's upright size `size`."""
        from .photos import read_mask

        return read_mask(self.masks[kind], size, self.path)


@dataclass(frozen=True)
class Person:
    name: str
    photos: tuple[Photo, ...]

    @property
    def references(self) -> tuple[Photo, ...]:
        return tuple(p for p in self.photos if p.is_reference)

    @property
    def targets(self) -> tuple[Photo, ...]:
        return tuple(p for p in self.photos if p.is_target)


@dataclass(frozen=True)
class FaceDataset:
    root: Path
    layout: str
    people: Mapping[str, Person]
    splits: Mapping[str, tuple[str, ...]]

    def split(self, name: str) -> list[Person]:
        if name == "all":
            return list(self.people.values())
        if name not in SPLITS:
            raise PVAError(f"split: must be one of {(*SPLITS, 'all')}, got {name!r}.")
        return [self.people[i] for i in self.splits.get(name, ())]

    def describe(self) -> str:
        sizes = ", ".join(f"{len(self.splits.get(s, ()))} {s}" for s in SPLITS)
        photos = sum(len(p.photos) for p in self.people.values())
        return f"{self.layout} dataset {self.root}: {len(self.people)} people ({sizes}), {photos} photos"


def open_dataset(
    root: str | Path,
    layout: str = "auto",
    seed: int = 0,
    test_fraction: float = 0.3,
    val_fraction: float = 0.1,
    annotation: str | Path | None = None,
) -> FaceDataset:
    """Index a dataset (no image is opened here)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise PVAError(f"layout: must be one of {LAYOUTS}, got {layout!r}.")
    if not root.is_dir():
        raise PVAError(
            f"dataset: {root} is not a folder. Give the folder that holds one sub-folder per person."
        )
    if layout == "auto":
        layout = "celebahq-idi" if (root / "IDI").is_dir() or root.name == "IDI" else "folders"
    if layout == "celebahq-idi":
        return _open_idi(root, annotation)
    return _open_folders(root, seed, test_fraction, val_fraction)


# -- folders -----------------------------------------------------------------------------------
# One listing per folder (os.scandir: a file's kind comes with its name, no stat per entry):
# a dataset of 100k people and a million photos is indexed without a million stat calls.
def _listing(folder: Path) -> dict[str, os.DirEntry]:
    with os.scandir(folder) as entries:
        return {entry.name: entry for entry in entries}


def _image_names(listing: dict[str, os.DirEntry]) -> list[str]:
    """The image files of a folder's listing, by name (is_file follows links, as Path.is_file)."""
    return sorted(
        name
        for name, entry in listing.items()
        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and entry.is_file()
    )


def _images_in(folder: Path) -> list[Path]:
    return [folder / name for name in _image_names(_listing(folder))]


def _caption(folder: Path, image_name: str, listing: dict[str, os.DirEntry]) -> str | None:
    """The photo's sidecar caption (<image>.txt in its folder's `listing`), if it has one."""
    sidecar = listing.get(f"{os.path.splitext(image_name)[0]}.txt")
    if sidecar is None or not sidecar.is_file():
        return None
    text = (folder / sidecar.name).read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def _open_folders(root: Path, seed: int, test_fraction: float, val_fraction: float) -> FaceDataset:
    people: dict[str, Person] = {}
    folders = sorted(
        name for name, entry in _listing(root).items() if not name.startswith(".") and entry.is_dir()
    )
    for name in folders:
        folder = root / name
        listing = _listing(folder)
        photos = tuple(
            Photo(folder / image, f"{name}/{image}", _caption(folder, image, listing))
            for image in _image_names(listing)
        )
        if photos:
            people[name] = Person(name, photos)
    if not people:
        raise PVAError(
            f"dataset: no people found in {root}. Expected one folder per person with their photos "
            f"inside (root/<person>/<photo>{'|'.join(IMAGE_SUFFIXES)}), or a CelebAHQ-IDI export (root/IDI/...)."
        )
    split_file = root / "split.json"
    if split_file.is_file():
        splits = _read_split_file(split_file, people)
    else:
        splits = seeded_split(sorted(people), seed, test_fraction, val_fraction)
    return FaceDataset(root, "folders", people, splits)


def seeded_split(
    names: list[str], seed: int, test_fraction: float, val_fraction: float
) -> dict[str, tuple[str, ...]]:
    """A split by person: a seeded shuffle, then test, val and the rest train."""
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise PVAError(
            f"split fractions: test {test_fraction} and val {val_fraction} must be in [0, 1) and leave some for training."
        )
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    return {
        "test": tuple(sorted(order[:n_test])),
        "val": tuple(sorted(order[n_test : n_test + n_val])),
        "train": tuple(sorted(order[n_test + n_val :])),
    }


def _load_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PVAError(f"{what} {path} cannot be read as JSON ({error}).") from None


def _read_split_file(path: Path, people: Mapping[str, Person]) -> dict[str, tuple[str, ...]]:
    data = _load_json(path, "split file")
    if not isinstance(data, dict) or not set(data) <= set(SPLITS) or not data:
        raise PVAError(
            f'split file {path}: expected {{"train": [...], "val": [...], "test": [...]}} with person '
            f"folder names, got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}."
        )
    splits: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for name in SPLITS:
        ids = [str(i) for i in data.get(name, [])]
        unknown = [i for i in ids if i not in people]
        if unknown:
            raise PVAError(
                f"split file {path}: {len(unknown)} {name} people have no folder with photos in {path.parent} "
                f"(e.g. {unknown[0]!r})."
            )
        twice = [i for i in ids if i in seen]
        if twice:
            raise PVAError(
                f"split file {path}: {twice[0]!r} is in both {seen[twice[0]]} and {name}; a person belongs to one split."
            )
        seen.update(dict.fromkeys(ids, name))
        splits[name] = tuple(ids)
    return splits


# -- CelebAHQ-IDI ------------------------------------------------------------------------------
def _find_annotation(root: Path) -> Path | None:
    for base in (root, root.parent):
        found = sorted((base / "annotation").glob("idi-*.json")) if (base / "annotation").is_dir() else []
        if found:
            return found[0]
    return None


def _idi_folder_name(identity: object) -> str:
    # the export script names folders f"{id:04d}" for integer ids
    return f"{identity:04d}" if isinstance(identity, int) else str(identity)


def _open_idi(root: Path, annotation: str | Path | None) -> FaceDataset:
    idi = root if root.name == "IDI" else root / "IDI"
    if not idi.is_dir():
        raise PVAError(f"dataset: {root} has no IDI/ folder; is it a CelebAHQ-IDI export?")
    annotation = Path(annotation) if annotation else _find_annotation(idi.parent)
    people: dict[str, Person] = {}
    for folder in sorted(p for p in idi.iterdir() if p.is_dir()):
        person = _idi_person(folder, idi.parent)
        if person.photos:
            people[folder.name] = person
    if not people:
        raise PVAError(f"dataset: no people in {idi} (expected IDI/<id>/ref_image and infer_image folders).")
    if annotation is None:
        splits = {"test": tuple(sorted(people)), "train": (), "val": ()}  # the export holds one split
        return FaceDataset(idi.parent, "celebahq-idi", people, splits)
    data = _load_json(annotation, "annotation")
    if not isinstance(data, dict) or not any(f"{s}_ids" in data for s in SPLITS):
        raise PVAError(
            f"annotation {annotation}: no train_ids / val_ids / test_ids lists; is it CelebAHQ-IDI's idi-N.json?"
        )
    id2image = data.get("id2image", {})
    splits = {}
    for split in SPLITS:
        ids = [_idi_folder_name(i) for i in data.get(f"{split}_ids", [])]
        # an export holds the split it was made for; the annotation knows every split
        splits[split] = tuple(i for i in ids if i in people)
        for identity in data.get(f"{split}_ids", []):
            name = _idi_folder_name(identity)
            if name in people:
                _check_listed_images(
                    people[name], id2image.get(str(identity), id2image.get(identity)), annotation
                )
    return FaceDataset(idi.parent, "celebahq-idi", people, splits)


def _idi_person(folder: Path, root: Path) -> Person:
    photos = []
    refs = folder / "ref_image"
    if refs.is_dir():
        photos += [
            Photo(p, p.relative_to(root).as_posix(), is_reference=True, is_target=False)
            for p in _images_in(refs)
        ]
    infer, masks = folder / "infer_image", folder / "infer_mask"
    if infer.is_dir():
        for image in _images_in(infer):
            found = {t: masks / f"{image.stem}_{t}.png" for t in IDI_MASK_TYPES}
            photos.append(
                Photo(
                    image,
                    image.relative_to(root).as_posix(),
                    masks={t: p for t, p in found.items() if p.is_file()},
                    is_reference=False,
                    is_target=True,
                )
            )
    return Person(folder.name, tuple(photos))


def _check_listed_images(person: Person, listed: object, annotation: Path) -> None:
    """The annotation's image lists must name photos that exist in the export."""
    if not isinstance(listed, dict):
        return
    have = {p.path.stem for p in person.photos}
    for kind in ("infer", "ref"):
        for name in listed.get(kind, []):
            stem = Path(str(name)).stem.split("_")[0]
            if stem not in have:
                raise PVAError(
                    f"annotation {annotation}: person {person.name} lists {kind} image {name!r}, which is not in "
                    f"{person.photos[0].path.parent.parent if person.photos else person.name}. The export and the "
                    "annotation do not match."
                )
