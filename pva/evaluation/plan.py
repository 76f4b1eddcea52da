"""Which identities, references, targets and masks an evaluation covers, and the pictures
themselves (targets at the working resolution, masks, references as they are)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.datasets import FaceDataset, Person, Photo
from ..errors import PVAError
from ..faces.detection import DetectedFace, DetectionSettings
from ..faces.regions import region_mask
from ..measure.recognition import FaceLocator
from .settings import EvaluationSettings, region_of


@dataclass(frozen=True)
class IdentityPlan:
    name: str
    references: tuple[Photo, ...]
    targets: tuple[Photo, ...]


def plan_identities(dataset: FaceDataset, settings: EvaluationSettings) -> list[IdentityPlan]:
    """The split's people, sorted by name: references (at most settings.references) and targets.

    CelebAHQ-IDI keeps them apart already (ref_image / infer_image). In the folder layout every
    photo can be either: the first photos (by name) are the references, the rest the targets."""
    people = sorted(dataset.split(settings.split), key=lambda p: p.name)
    if settings.limit_people:
        people = people[: settings.limit_people]
    plans = [_plan(person, settings.references) for person in people]
    plans = [p for p in plans if p.targets and p.references]
    if not plans:
        raise PVAError(
            f"evaluation: the {settings.split!r} split of {dataset.describe()} has no person with both reference "
            "photos and photos to inpaint; there is nothing to evaluate. (Folder layout: each person needs at "
            "least 2 photos; check split.json or the annotation file.)"
        )
    return plans


def _plan(person: Person, references: int) -> IdentityPlan:
    photos = sorted(person.photos, key=lambda p: p.key)
    refs = [p for p in photos if p.is_reference]
    targets = [p for p in photos if p.is_target]
    if any(p.is_reference and p.is_target for p in photos):  # the folder layout
        refs = refs[: min(references, len(photos) - 1)]
        targets = [p for p in targets if p not in refs]
    return IdentityPlan(person.name, tuple(refs[:references]), tuple(targets))


# -- pictures ------------------------------------------------------------------------------------
def square(image: torch.Tensor, resolution: int, mode: str = "bicubic") -> torch.Tensor:
    """Centre-crop [H, W, C] to a square, resize to resolution (antialiased)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side].permute(2, 0, 1)[None]
    if side != resolution:
        antialias = mode != "nearest"
        crop = F.interpolate(crop, size=(resolution, resolution), mode=mode, antialias=antialias)
    return crop[0].permute(1, 2, 0).clamp(0, 1)


@dataclass(frozen=True)
class Target:
    """One photo to inpaint, at the working resolution, and its mask per mask type."""

    person: str
    photo: Photo
    pixels: torch.Tensor  # [R, R, 3]
    masks: dict[str, torch.Tensor]  # mask type -> [R, R] 0/1


def load_target(
    person: str, photo: Photo, settings: EvaluationSettings, locator: FaceLocator
) -> Target | None:
    """The target and its masks, or None when it needs a face for its masks and none is found."""
    original = photo.read()
    pixels = square(original, settings.resolution)
    masks = {}
    face: DetectedFace | None = None
    for mask_type in settings.mask_types:
        if mask_type in photo.masks:
            mask = photo.read_mask(mask_type, tuple(original.shape[:2]))
            masks[mask_type] = (square(mask[..., None], settings.resolution, "nearest")[..., 0] > 0.5).float()
            continue
        if photo.masks:
            raise PVAError(
                f"photo {photo.path}: the dataset has masks for it but none of type {mask_type!r} "
                f"(it has {sorted(photo.masks)}); choose mask types the dataset provides."
            )
        region = region_of(mask_type)
        if region is None:
            raise PVAError(f"mask type {mask_type!r} needs mask files (CelebAHQ-IDI); this dataset has none.")
        if face is None:
            (face,) = locator.locate([pixels], what="photos to inpaint")
            if face is None:
                return None
        size = settings.resolution
        masks[mask_type] = region_mask(face, region, size, size, settings.mask_precision)
    return Target(person, photo, pixels, masks)


def locator_for(settings: EvaluationSettings) -> FaceLocator:
    return FaceLocator(settings.faces, DetectionSettings(threshold=settings.detection_threshold))
