"""A tiny synthetic face dataset in the pack's folder layout, for evaluation tests.

Each "person" is a face of their own skin and eye colour, drawn where an aligned face photo has
its face (the research code's fixed crop, with eyes, nose and mouth on the ArcFace template), so
the evaluation's aligned mode (no detector) reads them like CelebA-HQ photos. Photos of one
person differ by a small shift, lighting and noise. MTCNN finds no face in them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pva.measure.recognition import aligned_face


def synthetic_face(
    size: int, skin: tuple, eyes: tuple, shift: tuple[float, float], light: float, seed: int
) -> np.ndarray:
    """[size, size, 3] uint8."""
    rng = np.random.default_rng(seed)
    face = aligned_face(size, size)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = shift[0] * size, shift[1] * size
    x1, y1, x2, y2 = face.box
    cx, cy, rx, ry = (x1 + x2) / 2 + dx, (y1 + y2) / 2 + dy, (x2 - x1) / 2.3, (y2 - y1) / 1.9
    image = np.ones((size, size, 3), np.float32) * np.array([0.35, 0.4, 0.45])
    image[((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1] = skin
    r = (x2 - x1) * 0.06
    for i, (lx, ly) in enumerate(face.landmarks):
        lx, ly = lx + dx, ly + dy
        colour, radius = (
            (eyes, r) if i < 2 else ((0.5, 0.3, 0.3), r * 0.8) if i == 2 else ((0.6, 0.15, 0.2), r * 0.7)
        )
        image[(xs - lx) ** 2 + (ys - ly) ** 2 <= radius**2] = colour
    image = image * light + rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


PEOPLE = {  # name: (skin, eyes)
    "ada": ((0.85, 0.65, 0.5), (0.1, 0.3, 0.7)),
    "bo": ((0.45, 0.3, 0.2), (0.15, 0.1, 0.05)),
    "cy": ((0.95, 0.8, 0.7), (0.2, 0.6, 0.3)),
    "di": ((0.6, 0.45, 0.35), (0.5, 0.35, 0.1)),
}


def write_synthetic_split(root: Path, people: int = 2, photos: int = 3, size: int = 64) -> Path:
    """root/<person>/<i>.png for the first `people` people, all in the test split."""
    names = list(PEOPLE)[:people]
    for p, name in enumerate(names):
        skin, eyes = PEOPLE[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(photos):
            shift = (0.01 * (i - 1), 0.008 * ((i * 2) % 3 - 1))
            pixels = synthetic_face(size, skin, eyes, shift, 1.0 + 0.05 * (i - 1), seed=100 * p + i)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (root / "split.json").write_text(json.dumps({"test": names, "train": [], "val": []}))
    return root
