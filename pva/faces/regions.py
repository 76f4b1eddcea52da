"""Masks of facial regions (CelebAHQ-IDI's region types) from a detected face, with a mask
*precision* control in SmartBrush's sense, plus grow and feather in pixels.

Every region except the whole face is laid out in the face's own frame: origin between the
eyes, u along the eye line, v towards the mouth, one unit = the distance between the eyes. So
the regions turn with a tilted head. The whole face is the ellipse inscribed in the face box
grown by 15% on each side (what quick personalization has always masked).

Each region is an implicit function f (f <= 1 inside, degree-1 homogeneous like a distance).
Precision p blends it with the same function of the region's axis-aligned bounding box:
    inside at p  <=>  (1 - p) f + p g <= 1
Since the region lies inside its box, p = 0 is the exact shape, p = 1 the box, and the mask
only grows with p (SmartBrush: coarse masks give the model freedom of shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import PVAError
from .detection import DetectedFace, Faces

REGIONS = ("whole face", "lower face", "eyes and brows", "eyes", "nose", "mouth")
WHOLE_FACE_GROW = 0.15  # the face box grown by this fraction on each side

Implicit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) pixel grids -> f


def _pixel_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates, [H, W] each."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    return torch.meshgrid(ys, xs, indexing="ij")[::-1]


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> Implicit:
    """Axis-aligned ellipse in photo coordinates."""
    rx, ry = max(rx, 1e-6), max(ry, 1e-6)
    return lambda x, y: torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)


class _FaceFrame:
    """Maps photo pixels to face coordinates (u, v), in units of the eye distance."""

    def __init__(self, face: DetectedFace):
        (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
        self.cx, self.cy = (lx + rx) / 2, (ly + ry) / 2
        self.unit = max(math.hypot(rx - lx, ry - ly), 1e-6)
        self.cos, self.sin = math.cos(face.eye_angle), math.sin(face.eye_angle)

    def uv(self, x: torch.Tensor | float, y: torch.Tensor | float) -> tuple:
        dx, dy = x - self.cx, y - self.cy
        return (dx * self.cos + dy * self.sin) / self.unit, (-dx * self.sin + dy * self.cos) / self.unit

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> Implicit:
        ru, rv = max(ru, 1e-6), max(rv, 1e-6)

        def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            u, v = self.uv(x, y)
            return torch.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)

        return f

    def below(self, v0: float) -> Implicit:
        """The half plane v >= v0 (below a line parallel to the eyes)."""
        return lambda x, y: 1 + (v0 - self.uv(x, y)[1])


def whole_face(face: DetectedFace, grow: float = WHOLE_FACE_GROW) -> Implicit:
    x1, y1, x2, y2 = face.box
    cx, cy = face.center
    return _ellipse(cx, cy, (x2 - x1) / 2 * (1 + 2 * grow), (y2 - y1) / 2 * (1 + 2 * grow))


def _region(face: DetectedFace, region: str) -> Implicit:
    if region == "whole face":
        return whole_face(face)
    frame = _FaceFrame(face)
    nose_u, nose_v = frame.uv(*face.landmarks[2])
    (left_u, left_v), (right_u, right_v) = frame.uv(*face.landmarks[3]), frame.uv(*face.landmarks[4])
    mouth_u, mouth_v = (left_u + right_u) / 2, (left_v + right_v) / 2
    if region == "eyes":
        left, right = frame.ellipse(-0.5, 0.0, 0.3, 0.18), frame.ellipse(0.5, 0.0, 0.3, 0.18)
        return lambda x, y: torch.minimum(left(x, y), right(x, y))
    if region == "eyes and brows":
        return frame.ellipse(0.0, -0.18, 0.92, 0.42)
    if region == "nose":
        top, bottom = 0.1, nose_v + 0.15
        return frame.ellipse(nose_u * 0.7, (top + bottom) / 2, 0.3, (bottom - top) / 2)
    if region == "mouth":
        half_width = abs(right_u - left_u) / 2 + 0.15
        return frame.ellipse(mouth_u, mouth_v + 0.03, half_width, 0.3)
    if region == "lower face":
        # the whole face below a line between the eyes and the nose tip: nose, mouth and chin
        face_f, lower = whole_face(face), frame.below(0.45 * nose_v)
        return lambda x, y: torch.maximum(face_f(x, y), lower(x, y))
    raise PVAError(f"region: must be one of {REGIONS}, got {region!r}.")


def _box_implicit(mask: torch.Tensor) -> Implicit | None:
    """g of the mask's bounding box (pixel edges), or None for an empty mask."""
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if rows.numel() == 0:
        return None
    y1, y2 = rows.min().item(), rows.max().item() + 1
    x1, x2 = cols.min().item(), cols.max().item() + 1
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return lambda x, y: torch.maximum((x - cx).abs() / hw, (y - cy).abs() / hh)


def region_mask(
    face: DetectedFace, region: str, height: int, width: int, precision: float = 0.0
) -> torch.Tensor:
    """[H, W] float 0/1 mask of one face's region at the given precision (0 exact .. 1 box)."""
    if not 0.0 <= precision <= 1.0:
        raise PVAError(f"precision: must be between 0 (exact shape) and 1 (bounding box), got {precision}.")
    x, y = _pixel_grid(height, width)
    f = _region(face, region)(x, y)
    shape = f <= 1
    if precision == 0.0:
        return shape.float()
    g = _box_implicit(shape)
    if g is None:
        return shape.float()
    return ((1 - precision) * f + precision * g(x, y) <= 1).float()


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate ([..., H, W] 0/1) by `pixels` (a square neighbourhood), or erode when negative."""
    if pixels == 0:
        return mask
    k = 2 * abs(pixels) + 1
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    source = flat if pixels > 0 else 1 - flat
    # separable max pooling: rows then columns
    grown = F.max_pool2d(source, (1, k), stride=1, padding=(0, abs(pixels)))
    grown = F.max_pool2d(grown, (k, 1), stride=1, padding=(abs(pixels), 0))
    out = grown if pixels > 0 else 1 - grown
    return out.reshape(mask.shape)


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soften the edges ([..., H, W]) with a Gaussian whose transition spans about `pixels`
    on each side of the edge; 0 keeps the mask hard."""
    if pixels <= 0:
        return mask
    sigma = pixels / 2.5
    radius = pixels
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(mask.shape).clamp(0, 1)


def face_masks(
    faces: Faces,
    regions: Sequence[str],
    precision: float = 0.0,
    grow: int = 0,
    feather: int = 0,
    per_face: bool = False,
) -> torch.Tensor:
    """MASKs at the photos' size: one per photo (the union of its faces' regions), or with
    `per_face` one per face (photo by photo, in the faces' order). [N, H, W] float."""
    if not regions:
        raise PVAError(f"region: choose at least one of {REGIONS}.")
    if not faces.photos:
        raise PVAError("faces: no photos.")
    sizes = {(p.height, p.width) for p in faces.photos}
    if len(sizes) > 1:
        raise PVAError("faces: photos of different sizes cannot make one MASK batch.")

    def one(face: DetectedFace, height: int, width: int) -> torch.Tensor:
        masks = [region_mask(face, r, height, width, precision) for r in regions]
        return torch.stack(masks).amax(dim=0)

    masks = []
    for photo in faces.photos:
        own = [one(face, photo.height, photo.width) for face in photo.faces]
        if per_face:
            masks.extend(own)
        else:
            empty = torch.zeros(photo.height, photo.width)
            masks.append(torch.stack(own).amax(dim=0) if own else empty)
    if not masks:
        height, width = next(iter(sizes))
        return torch.zeros(0, height, width)
    return feather_mask(grow_mask(torch.stack(masks), grow), feather)
