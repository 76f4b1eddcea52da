"""Many people made from a few real faces, written as a dataset in the folder-per-person layout.

Each synthetic person is one real portrait (tests/harness/portraits.py) with a person-specific
skin tint inside the face and a person-specific stretch of the whole photo; each of their photos
is another framing (shift, zoom, mirror, exposure). MTCNN still finds the faces, so the people
go through the pack's real detection and embedding path. What tells two people of the same
portrait apart is the colour of the face, which nothing outside the face reveals: the one thing
an inpainting model can only learn from the identity.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from .portraits import SINGLE_PORTRAITS, portrait

PHOTO_SIZE = 128


@cache
def _face_box(name: str) -> tuple[float, float, float, float]:
    import torch

    from pva.faces.detection import find_faces

    pixels = torch.from_numpy(portrait(name)).float().div(255)[None]
    return find_faces(pixels).photos[0].faces[0].box


def _tinted(pixels: np.ndarray, box: tuple, tint: np.ndarray) -> np.ndarray:
    """The face (a soft ellipse around the box) multiplied by `tint`, the rest untouched."""
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.62, (y2 - y1) * 0.68
    ys, xs = np.mgrid[0:height, 0:width]
    r = np.sqrt(((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2)
    weight = np.clip((1.15 - r) / 0.3, 0, 1)[..., None]
    coloured = pixels.astype(np.float32) * (1 + weight * (tint - 1))
    return np.clip(coloured, 0, 255).astype(np.uint8)


def person_photos(index: int, count: int, seed: int = 0, size: int = PHOTO_SIZE) -> list[np.ndarray]:
    """`count` photos ([size, size, 3] uint8) of synthetic person `index`."""
    rng = np.random.default_rng([seed, index])
    name = SINGLE_PORTRAITS[index % len(SINGLE_PORTRAITS)]
    tint = rng.uniform(0.55, 1.45, size=3)
    stretch = rng.uniform(0.85, 1.15)
    x1, y1, x2, y2 = _face_box(name)
    face = max(x2 - x1, y2 - y1)
    # Only the region the framings can reach (the photo's border repeated beyond its edge).
    reach = int(face * 2.4 / 2 * 1.2 + 0.12 * face) + 2
    cx0, cy0 = int((x1 + x2) / 2), int((y1 + y2) / 2)
    source = portrait(name)
    pad = ((max(0, reach - cy0), max(0, cy0 + reach - source.shape[0])), (max(0, reach - cx0), max(0, cx0 + reach - source.shape[1])), (0, 0))  # fmt: skip
    region = np.pad(source, pad, mode="edge")
    top, left = cy0 - reach + pad[0][0], cx0 - reach + pad[1][0]
    region = region[top : top + 2 * reach, left : left + 2 * reach]
    offset_x, offset_y = cx0 - reach, cy0 - reach  # photo coordinates of the region's corner
    box = (x1 - offset_x, y1 - offset_y, x2 - offset_x, y2 - offset_y)
    image = Image.fromarray(_tinted(region, box, tint))
    photos = []
    for _ in range(count):
        side = face * rng.uniform(1.7, 2.4)
        cx = (box[0] + box[2]) / 2 + rng.uniform(-0.12, 0.12) * face
        cy = (box[1] + box[3]) / 2 + rng.uniform(-0.12, 0.12) * face
        frame = (cx - side / 2 * stretch, cy - side / 2, cx + side / 2 * stretch, cy + side / 2)
        photo = image.resize((size, size), Image.Resampling.BICUBIC, box=frame)
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(photo, dtype=np.float32) * rng.uniform(0.9, 1.1)
        photos.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return photos


def write_people(root: Path, people: int, photos: int, seed: int = 0, size: int = PHOTO_SIZE) -> Path:
    """root/person-NNN/K.png for `people` synthetic people with `photos` photos each."""
    for index in range(people):
        folder = root / f"person-{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, pixels in enumerate(person_photos(index, photos, seed, size)):
            Image.fromarray(pixels).save(folder / f"{k}.png")
    return root
