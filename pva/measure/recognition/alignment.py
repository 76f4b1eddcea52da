"""Where a face is in a photo, for recognizers that do not detect faces themselves, and the
5-point similarity alignment that ArcFace/CosFace models are trained on.

Two ways to locate the face:
- detect: MTCNN (pva.faces.detection: the pack's one detector), the chosen face of each photo;
- aligned: the photo is already a face-aligned crop (CelebA-HQ, CelebAHQ-IDI, faces generated
  from aligned training data), and the face sits at a fixed place. The research code scores such
  photos without a detector, on a fixed crop: at 256 px, rows 35..223 and columns 32..220. The
  crop becomes a DetectedFace whose landmarks are the ArcFace template placed in that crop and
  whose box is where MTCNN's box sits relative to those landmarks, so every recognizer (and the
  facial-region masks) reads it like a detected face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import PVAError
from ...faces.detection import DetectedFace, DetectionSettings, find_faces

FACE_MODES = ("detect", "aligned")
# The research code's fixed face crop of aligned photos, as fractions of the side (x1, y1, x2, y2).
ALIGNED_CROP = (32 / 256, 35 / 256, 220 / 256, 223 / 256)
# ArcFace's 5-point template in a 112x112 crop (insightface): left eye, right eye, nose tip,
# left and right mouth corner, in the same order as MTCNN's landmarks.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
ARCFACE_SIZE = 112
# MTCNN's face box in the template's coordinates: the mean over the nine real portraits of
# tests/harness/portraits.py (each within about 9 px).
TEMPLATE_FACE_BOX = (19.0, 12.0, 94.0, 117.0)


def aligned_face(
    height: int, width: int, crop: tuple[float, float, float, float] = ALIGNED_CROP
) -> DetectedFace:
    """The fixed face of an aligned photo: the template's landmarks placed in the crop, and the
    face box MTCNN would give for them."""
    x1, y1, x2, y2 = crop[0] * width, crop[1] * height, crop[2] * width, crop[3] * height
    sx, sy = (x2 - x1) / ARCFACE_SIZE, (y2 - y1) / ARCFACE_SIZE
    # crop pixel u covers x1 + u * sx .. x1 + (u + 1) * sx of the photo: box edges are pixel
    # edges, landmarks pixel-centre coordinates
    landmarks = tuple(
        (float(x1 + (x + 0.5) * sx - 0.5), float(y1 + (y + 0.5) * sy - 0.5)) for x, y in ARCFACE_TEMPLATE
    )
    bx1, by1, bx2, by2 = TEMPLATE_FACE_BOX
    box = (x1 + bx1 * sx, y1 + by1 * sy, x1 + bx2 * sx, y1 + by2 * sy)
    return DetectedFace(box=box, landmarks=landmarks, probability=1.0)


@dataclass(frozen=True)
class FaceLocator:
    """How the face of each photo is found: `mode` detect (MTCNN, face `face_index` in the
    detection order) or aligned (the fixed crop)."""

    mode: str = "detect"
    detection: DetectionSettings = field(default_factory=DetectionSettings)
    face_index: int = 0
    crop: tuple[float, float, float, float] = ALIGNED_CROP

    def __post_init__(self) -> None:
        if self.mode not in FACE_MODES:
            raise PVAError(f"faces: must be one of {FACE_MODES}, got {self.mode!r}.")
        if self.face_index < 0:
            raise PVAError(f"face_index: got {self.face_index}, expected 0 (the first face) or more.")
        x1, y1, x2, y2 = self.crop
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise PVAError(f"aligned crop: {self.crop} must be fractions x1 < x2, y1 < y2 within 0..1.")

    def locate(self, photos: list[torch.Tensor], what: str = "image") -> list[DetectedFace | None]:
        """One face per [H,W,3] photo, or None where none was found."""
        if self.mode == "aligned":
            return [aligned_face(int(p.shape[0]), int(p.shape[1]), self.crop) for p in photos]
        found = find_faces(photos, self.detection, what=what)
        return [p.faces[self.face_index] if len(p.faces) > self.face_index else None for p in found.photos]

    def describe(self) -> str:
        if self.mode == "aligned":
            return f"aligned photos, fixed face crop {tuple(round(c, 4) for c in self.crop)} (no detector)"
        return (
            f"MTCNN detection, threshold {self.detection.threshold:g}, face {self.face_index} in "
            f"'{self.detection.order}' order"
        )


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + translation mapping `source` points onto `target`
    points in the least-squares sense (Umeyama's method, no reflection)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    covariance = t.T @ s / len(source)
    u, d, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def warp_affine(photo: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[H,W,3] photo -> [3, h, w] crop whose pixel (u, v) shows the photo at matrix^-1 (u, v)
    (pixel centres at integer coordinates, as in OpenCV's warpAffine). Large reductions are
    resized with antialiasing first, so small crops of big photos do not alias."""
    out_h, out_w = size
    full = np.vstack([matrix, [0, 0, 1]])
    inverse = np.linalg.inv(full)
    image = photo.float().permute(2, 0, 1)[None]
    scale = math.sqrt(abs(np.linalg.det(inverse[:2, :2])))  # photo pixels per crop pixel
    if scale > 1.5:
        factor = 1 / scale
        height, width = max(1, round(image.shape[-2] * factor)), max(1, round(image.shape[-1] * factor))
        sy, sx = height / photo.shape[0], width / photo.shape[1]
        image = F.interpolate(
            image, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
        # photo pixel centre x maps to (x + 0.5) * s - 0.5 in the resized photo
        resize = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
        inverse = resize @ inverse
    vs, us = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64), indexing="ij"
    )
    points = torch.stack([us.flatten(), vs.flatten(), torch.ones(out_h * out_w, dtype=torch.float64)])
    source = torch.from_numpy(inverse[:2]) @ points  # [2, N] pixel coordinates in the (resized) photo
    height, width = image.shape[-2], image.shape[-1]
    grid = torch.stack([(2 * source[0] + 1) / width - 1, (2 * source[1] + 1) / height - 1], dim=-1)
    grid = grid.reshape(1, out_h, out_w, 2).to(image.dtype)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def arcface_crop(photo: torch.Tensor, face: DetectedFace, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """[3, size, size] crop (the photo's 0..1 values) with the face's 5 landmarks on ArcFace's template."""
    template = ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)
    matrix = similarity_transform(np.array(face.landmarks), template)
    return warp_affine(photo, matrix, (size, size))
