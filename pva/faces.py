"""Face preparation for reference photos: MTCNN detection, eye-level alignment, face masks.

Reference photos arrive as ComfyUI IMAGE tensors (float32 [B,H,W,3] in 0..1) or as a python
list of such tensors when the photos differ in size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import NoFaceFoundError, PVAError
from .facenet import FACENET_PYTORCH_MISSING

ImageBatch = torch.Tensor | Sequence[torch.Tensor]

# MTCNN's first two stages only propose candidates; the user's threshold applies to the last one.
_STAGE_THRESHOLDS = (0.6, 0.7)
# MTCNN's image pyramid starts at its minimum face size (20 px); smaller photos have no pyramid.
_MIN_SIDE = 20

_mtcnn_cache: dict[str, object] = {}
_mtcnn_lock = threading.Lock()


@dataclass(frozen=True)
class DetectedFace:
    """One face found by MTCNN, in pixel coordinates of its photo."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    # left eye, right eye, nose, mouth left, mouth right (as seen in the photo), each (x, y)
    landmarks: tuple[tuple[float, float], ...]
    probability: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def eye_angle(self) -> float:
        """Angle of the line from the left to the right eye, in radians (0 = level)."""
        (lx, ly), (rx, ry) = self.landmarks[0], self.landmarks[1]
        return math.atan2(ry - ly, rx - lx)


def image_list(images: ImageBatch) -> list[torch.Tensor]:
    """Split a ComfyUI IMAGE batch (or a list of them) into [H,W,3] tensors, checking shapes."""

    def bad(what: str) -> PVAError:
        return PVAError(
            f"reference images: {what}. Expected a ComfyUI IMAGE, a tensor of shape "
            "[batch, height, width, 3] (or a list of them)."
        )

    if isinstance(images, torch.Tensor):
        parts = [images]
    elif isinstance(images, (list, tuple)):
        parts = list(images)
    else:
        raise bad(f"got {type(images).__name__}")
    out: list[torch.Tensor] = []
    for part in parts:
        if not isinstance(part, torch.Tensor):
            raise bad(f"got a list item of type {type(part).__name__}")
        # Inside a list a single [H,W,3] photo is accepted too; a top-level tensor must be batched.
        if part.dim() == 3 and part is not images:
            part = part.unsqueeze(0)
        if part.dim() != 4 or part.shape[-1] != 3 or part.shape[1] == 0 or part.shape[2] == 0:
            raise bad(f"got shape {list(part.shape)}")
        out.extend(part.unbind(0))
    if not out:
        raise bad("the batch is empty")
    return out


def _mtcnn(device: torch.device) -> object:
    """One MTCNN per device: loading its three nets each call would dominate detection time."""
    # imported here so the pack still loads (and can explain) when facenet-pytorch is missing
    try:
        from facenet_pytorch import MTCNN
    except ImportError as e:
        raise PVAError(FACENET_PYTORCH_MISSING) from e

    key = str(device)
    with _mtcnn_lock:
        if key not in _mtcnn_cache:
            _mtcnn_cache[key] = MTCNN(device=device).eval()
        return _mtcnn_cache[key]


def _detect_all(image: torch.Tensor, threshold: float, device: torch.device) -> list[DetectedFace]:
    """All faces in one [H,W,3] 0..1 photo, largest first."""
    if min(image.shape[0], image.shape[1]) < _MIN_SIDE:
        return []
    mtcnn = _mtcnn(device)
    from facenet_pytorch.models.utils.detect_face import detect_face

    pixels = (image.detach().float().clamp(0, 1) * 255).to(device)
    # detect_face directly (not MTCNN.detect) so the threshold is passed per call instead of being
    # set on the shared cached instance.
    with torch.no_grad():
        boxes, points = detect_face(
            pixels,
            mtcnn.min_face_size,
            mtcnn.pnet,
            mtcnn.rnet,
            mtcnn.onet,
            [*_STAGE_THRESHOLDS, threshold],
            mtcnn.factor,
            device,
        )
    boxes = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
    points = np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)
    faces = [
        DetectedFace(
            box=tuple(float(v) for v in b[:4]),
            landmarks=tuple((float(x), float(y)) for x, y in p),
            probability=float(b[4]),
        )
        for b, p in zip(boxes, points, strict=True)
    ]
    return sorted(faces, key=lambda f: f.area, reverse=True)


def detect_faces(
    images: ImageBatch,
    threshold: float = 0.9,
    face_index: int | None = None,
    device: torch.device | str | None = None,
) -> list[DetectedFace]:
    """One face per reference photo: the largest, or the `face_index`-th largest (0-based)."""
    photos = image_list(images)
    if not 0.0 < threshold < 1.0:
        raise PVAError(f"face detection threshold: got {threshold}, expected a value between 0 and 1.")
    if face_index is not None and face_index < 0:
        raise PVAError(f"face index: got {face_index}, expected 0 (largest face) or more.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    chosen: list[DetectedFace] = []
    for i, photo in enumerate(photos):
        where = f"reference photo {i + 1} of {len(photos)}"
        faces = _detect_all(photo, threshold, device)
        if not faces:
            raise NoFaceFoundError(
                f"{where}: no face found (MTCNN detection threshold {threshold:g}). Use a photo where "
                "the face is clearly visible, or lower the detection threshold."
            )
        index = face_index or 0
        if index >= len(faces):
            raise PVAError(
                f"{where}: face index {index} asked for, but only {len(faces)} face(s) found "
                f"(0 is the largest). Use a face index below {len(faces)}."
            )
        chosen.append(faces[index])
    return chosen


def align_faces(
    images: ImageBatch, faces: Sequence[DetectedFace], size: int = 160, margin: float = 0.2
) -> torch.Tensor:
    """Eye-levelled square face crops, [B,3,size,size], standardized for FaceNet.

    Rotating about the eye centre and then cropping around the (rotated) box centre is the same
    as rotating about the box centre, so one affine map per photo does rotation, crop and resize.
    """
    photos = image_list(images)
    if len(faces) != len(photos):
        raise PVAError(f"reference images: {len(photos)} photos but {len(faces)} detected faces.")
    crops = []
    for photo, face in zip(photos, faces, strict=True):
        h, w = photo.shape[0], photo.shape[1]
        x1, y1, x2, y2 = face.box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
        cos, sin = math.cos(face.eye_angle), math.sin(face.eye_angle)
        # Output (u, v) in [-1, 1] -> source pixel c + side/2 * R(angle) (u, v) -> normalized
        # source coordinates (align_corners=False: pixel edges at -1 and 1, so x_n = 2x/W - 1).
        theta = torch.tensor(
            [
                [side / w * cos, -side / w * sin, 2 * cx / w - 1],
                [side / h * sin, side / h * cos, 2 * cy / h - 1],
            ],
            dtype=torch.float32,
            device=photo.device,
        )
        grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)
        src = photo.float().permute(2, 0, 1)[None]
        crops.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # facenet-pytorch's fixed_image_standardization on 0..255 pixels
    return (torch.cat(crops) * 255 - 127.5) / 128


def face_region_mask(face: DetectedFace, height: int, width: int, grow: float = 0.15) -> torch.Tensor:
    """[H,W] float 0/1 ellipse inscribed in the face box grown by `grow` (fraction) on each side."""
    x1, y1, x2, y2 = face.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx = max((x2 - x1) / 2 * (1 + 2 * grow), 1e-6)
    ry = max((y2 - y1) / 2 * (1 + 2 * grow), 1e-6)
    # pixel centres; the image bounds clip the ellipse
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - cy) / ry
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - cx) / rx
    return ((ys[:, None] ** 2 + xs[None, :] ** 2) <= 1).float()
