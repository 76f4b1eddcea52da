"""Faces in photos: MTCNN detection that does not give up early, the order and selection of
the faces found (the FACES passed between nodes), and eye-levelled crops for recognition.

Photos arrive as ComfyUI IMAGE tensors (float32 [B,H,W,3] in 0..1) or as a python list of
such tensors when the photos differ in size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoFaceFoundError, PVAError

ImageBatch = torch.Tensor | Sequence[torch.Tensor]
Point = tuple[float, float]

FACENET_PYTORCH_MISSING = (
    "facenet-pytorch is not installed: run this pack's install.py, or "
    "`pip install --no-deps facenet-pytorch==2.6.0` (--no-deps keeps your torch)."
)

# MTCNN's first two stages only propose candidates; the user's threshold applies to the last one.
_STAGE_THRESHOLDS = (0.6, 0.7)
# MTCNN's pyramid scale step and the smallest face its first stage can see at scale 1.
_PYRAMID_FACTOR = 0.709
_SMALLEST_MTCNN_FACE = 12
# The retry ladder when nothing is found: smaller working sizes (as the InsightFace-based packs
# step down from 640 px), an enlarged copy for faces below MTCNN's minimum size, the photo turned
# sideways or upside down (MTCNN only finds upright faces), and a contrast-stretched copy.
_STEP_DOWN_SIDES = (1024, 640, 512, 384, 256)
_UPSCALE = 2.0
_UPSCALE_MAX_SIDE = 2048
# A face whose box leaves the photo by more than this fraction of its size (a face cut by the
# frame) gets a poor box and landmarks from MTCNN; it is found again on a copy padded by
# _BORDER_PAD of the longest side, where it is whole.
_BORDER_TOLERANCE = 0.05
_BORDER_PAD = 0.25
# MTCNN sometimes "finds" a sideways or upside-down face with an upright-looking but wrong set of
# landmarks, at a lower probability (0.97 where the upright face scores 0.9999): such faces are
# looked for in the turned copies too, and the more certain upright finding wins.
_SURE = 0.99

ORDERS = ("largest", "left to right", "top to bottom")

_mtcnn_cache: dict[str, object] = {}
_mtcnn_lock = threading.Lock()


@dataclass(frozen=True)
class DetectedFace:
    """One face found by MTCNN, in pixel coordinates of its photo."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    # left eye, right eye, nose, mouth left, mouth right (as seen in the photo), each (x, y)
    landmarks: tuple[Point, ...]
    probability: float

    @property
    def width(self) -> float:
        return max(0.0, self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return max(0.0, self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def size(self) -> float:
        """The face's side in pixels (the larger of the box's width and height)."""
        return max(self.width, self.height)

    @property
    def center(self) -> Point:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def eye_angle(self) -> float:
        """Angle of the line from the left to the right eye, in radians (0 = level)."""
        (lx, ly), (rx, ry) = self.landmarks[0], self.landmarks[1]
        return math.atan2(ry - ly, rx - lx)

    def mapped(self, point_map: Callable[[float, float], Point]) -> DetectedFace:
        """The same face with every point moved by `point_map` (the box becomes the bounding
        box of its moved corners)."""
        x1, y1, x2, y2 = self.box
        corners = [point_map(x, y) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return DetectedFace(
            box=(min(xs), min(ys), max(xs), max(ys)),
            landmarks=tuple(point_map(x, y) for x, y in self.landmarks),
            probability=self.probability,
        )


@dataclass(frozen=True)
class PhotoFaces:
    """The faces of one photo, in the chosen order."""

    height: int
    width: int
    faces: tuple[DetectedFace, ...] = ()


@dataclass(frozen=True)
class Faces:
    """FACES: for each photo of an IMAGE batch, its size and the faces chosen in it."""

    photos: tuple[PhotoFaces, ...]
    order: str = "largest"

    def __len__(self) -> int:
        return len(self.photos)

    @property
    def count(self) -> int:
        return sum(len(p.faces) for p in self.photos)

    def pairs(self) -> list[tuple[int, DetectedFace]]:
        """(photo index, face) for every face, photo by photo, in order."""
        return [(i, face) for i, photo in enumerate(self.photos) for face in photo.faces]

    def select(self, indices: Sequence[int] | None) -> Faces:
        """Keep the faces at `indices` (in each photo's order; None keeps all). Indices a photo
        does not have are left out there: `require_faces` reports them."""
        if indices is None:
            return self
        photos = tuple(
            replace(p, faces=tuple(p.faces[i] for i in indices if i < len(p.faces))) for p in self.photos
        )
        return replace(self, photos=photos)

    def check_images(self, images: list[torch.Tensor], what: str) -> None:
        """FACES found in other photos than `images` would put masks and crops in the wrong place."""
        sizes = [(int(p.shape[0]), int(p.shape[1])) for p in images]
        ours = [(p.height, p.width) for p in self.photos]
        if sizes != ours:
            raise PVAError(
                f"{what}: the faces were found in {len(ours)} photo(s) of size {_sizes(ours)}, but the "
                f"image has {len(sizes)} photo(s) of size {_sizes(sizes)}. Connect the same IMAGE to "
                "'Detect Faces (PVA)' and to this node."
            )


def _sizes(sizes: list[tuple[int, int]]) -> str:
    unique = sorted(set(sizes))
    return ", ".join(f"{w}x{h}" for h, w in unique[:3]) + (" ..." if len(unique) > 3 else "")


@dataclass(frozen=True)
class DetectionSettings:
    threshold: float = 0.9  # MTCNN's last-stage face probability
    min_face_size: int = 20  # px in the photo; smaller faces are ignored
    order: str = "largest"
    retry: bool = True  # retry ladder and refinements; False: MTCNN's first answer as it is
    device: torch.device | None = field(default=None, compare=False)

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise PVAError(
                f"face detection threshold: got {self.threshold}, expected a value between 0 and 1."
            )
        if self.min_face_size < 1:
            raise PVAError(f"min_face_size: got {self.min_face_size}, expected at least 1 pixel.")
        if self.order not in ORDERS:
            raise PVAError(f"order: must be one of {ORDERS}, got {self.order!r}.")


def image_list(images: ImageBatch, what: str = "reference images") -> list[torch.Tensor]:
    """Split a ComfyUI IMAGE batch (or a list of them) into [H,W,3] tensors, checking shapes."""

    def bad(problem: str) -> PVAError:
        return PVAError(
            f"{what}: {problem}. Expected a ComfyUI IMAGE, a tensor of shape "
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


def parse_selection(text: str) -> tuple[int, ...] | None:
    """'all' -> None; '0' / '0, 2' / '1-3' -> the face indices (0 = the first in the order)."""
    cleaned = text.strip().lower()
    if cleaned in ("", "all", "*"):
        return None
    indices: list[int] = []
    try:
        for part in cleaned.replace(" ", "").split(","):
            if "-" in part[1:]:
                first, last = part.split("-", 1)
                if int(first) > int(last):
                    raise ValueError(part)
                indices.extend(range(int(first), int(last) + 1))
            else:
                indices.append(int(part))
    except ValueError:
        raise PVAError(
            f"faces: {text!r} is not a face selection; use 'all', an index such as 0, a list such as "
            "0,2 or a range such as 0-2 (0 is the first face in the chosen order)."
        ) from None
    if any(i < 0 for i in indices):
        raise PVAError(f"faces: {text!r} has a negative index; 0 is the first face in the chosen order.")
    return tuple(dict.fromkeys(indices))


# -- MTCNN ----------------------------------------------------------------------------------
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


def _mtcnn_pass(pixels: torch.Tensor, threshold: float, min_size: float, device: torch.device) -> list:
    """Faces in one [H,W,3] photo of 0..255 values (MTCNN's own coordinates)."""
    min_size = max(min_size, _SMALLEST_MTCNN_FACE)
    if min(pixels.shape[0], pixels.shape[1]) < min_size:
        return []  # no face of that size fits (and MTCNN's image pyramid would be empty)
    mtcnn = _mtcnn(device)
    from facenet_pytorch.models.utils.detect_face import detect_face

    # detect_face directly (not MTCNN.detect) so the thresholds and minimum size are passed per
    # call instead of being set on the shared cached instance.
    with torch.no_grad():
        boxes, points = detect_face(
            pixels.to(device),
            min_size,
            mtcnn.pnet,
            mtcnn.rnet,
            mtcnn.onet,
            [*_STAGE_THRESHOLDS, threshold],
            _PYRAMID_FACTOR,
            device,
        )
    boxes = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
    points = np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)
    return [
        DetectedFace(
            box=tuple(float(v) for v in b[:4]),
            landmarks=tuple((float(x), float(y)) for x, y in p),
            probability=float(b[4]),
        )
        for b, p in zip(boxes, points, strict=True)
    ]


@dataclass(frozen=True)
class _Attempt:
    """One way of looking at a photo: how to make the working copy, and how to map a point of
    the copy back to the photo."""

    name: str
    make: Callable[[torch.Tensor], torch.Tensor]
    back: Callable[[float, float, int, int], Point]  # (x, y, photo height, photo width)
    min_size_scale: float = 1.0


def _resized(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    chw = pixels.permute(2, 0, 1)[None]
    height, width = round(pixels.shape[0] * scale), round(pixels.shape[1] * scale)
    out = F.interpolate(chw, size=(height, width), mode="bilinear", antialias=scale < 1, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 255)


def _contrast_stretched(pixels: torch.Tensor) -> torch.Tensor:
    low = torch.quantile(pixels.reshape(-1, 3)[::7].float(), 0.01, dim=0)
    high = torch.quantile(pixels.reshape(-1, 3)[::7].float(), 0.99, dim=0)
    return ((pixels - low) / (high - low).clamp(min=1.0) * 255).clamp(0, 255)


def _attempts(height: int, width: int) -> Iterator[_Attempt]:
    """The photo as it is, then the retry ladder."""
    yield _Attempt("as is", lambda p: p, lambda x, y, h, w: (x, y))
    longest = max(height, width)
    for side in _STEP_DOWN_SIDES:
        if side < longest:
            s = side / longest
            yield _Attempt(
                f"{side} px", lambda p, s=s: _resized(p, s), lambda x, y, h, w, s=s: (x / s, y / s), s
            )
    if longest * _UPSCALE <= _UPSCALE_MAX_SIDE:
        s = _UPSCALE
        yield _Attempt("enlarged", lambda p: _resized(p, s), lambda x, y, h, w: (x / s, y / s), s)
    # rot90 with k=1 turns the photo counter-clockwise: a point (x, y) of the photo lands at
    # (y, W - x); the maps below undo each turn.
    yield _Attempt("turned left", lambda p: torch.rot90(p, 1, (0, 1)), lambda x, y, h, w: (w - y, x))
    yield _Attempt("turned right", lambda p: torch.rot90(p, -1, (0, 1)), lambda x, y, h, w: (y, h - x))
    yield _Attempt("upside down", lambda p: torch.rot90(p, 2, (0, 1)), lambda x, y, h, w: (w - x, h - y))
    yield _Attempt("contrast stretched", _contrast_stretched, lambda x, y, h, w: (x, y))


def _padded(pixels: torch.Tensor, pad: int) -> torch.Tensor:
    chw = pixels.permute(2, 0, 1)[None]
    return F.pad(chw, (pad, pad, pad, pad), mode="replicate")[0].permute(1, 2, 0)


def _crosses_border(face: DetectedFace, height: int, width: int) -> bool:
    x1, y1, x2, y2 = face.box
    outside = max(-x1, -y1, x2 - width, y2 - height)
    return outside > _BORDER_TOLERANCE * face.size


def _iou(a: DetectedFace, b: DetectedFace) -> float:
    x1, y1 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    x2, y2 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / max(a.area + b.area - inter, 1e-6)


def _upright(face: DetectedFace) -> bool:
    """The mouth below the eyes, within 50 degrees of straight down (MTCNN's landmarks for a
    sideways or upside-down face it happened to find are unreliable)."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    (ax, ay), (bx, by) = face.landmarks[3], face.landmarks[4]
    down_x, down_y = (ax + bx - lx - rx) / 2, (ay + by - ly - ry) / 2
    return down_y > 0 and abs(math.atan2(down_x, down_y)) < math.radians(50)


def _refined(
    pixels: torch.Tensor,
    faces: list[DetectedFace],
    doubtful: list[bool],
    settings: DetectionSettings,
    device: torch.device,
) -> list[DetectedFace]:
    """Faces MTCNN saw badly, found again where they are whole and upright: faces cut by the
    photo's edge on a padded copy; doubtful faces (not upright, or found with little certainty,
    as judged where they were found) on turned copies. Faces seen well are kept as they are."""
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    cut = [_crosses_border(f, height, width) for f in faces]
    if not any(cut) and not any(doubtful):
        return faces
    candidates: list[DetectedFace] = []
    if any(cut):
        pad = round(_BORDER_PAD * max(height, width))
        found = _mtcnn_pass(_padded(pixels, pad), settings.threshold, settings.min_face_size, device)
        candidates += [f.mapped(lambda x, y: (x - pad, y - pad)) for f in found if _upright(f)]
    if any(doubtful):
        for attempt in _attempts(height, width):
            if attempt.name in ("turned left", "turned right", "upside down"):
                found = _mtcnn_pass(attempt.make(pixels), settings.threshold, settings.min_face_size, device)
                back = attempt.back
                candidates += [
                    f.mapped(lambda x, y, back=back: back(x, y, height, width)) for f in found if _upright(f)
                ]
    refined = []
    for face, is_cut, is_doubtful in zip(faces, cut, doubtful, strict=True):
        if is_cut or is_doubtful:
            matches = [c for c in candidates if _iou(c, face) > 0.3]
            best = max(matches, key=lambda c: (c.probability, _iou(c, face)), default=None)
            if best is not None and (is_cut or best.probability >= face.probability):
                face = best
        refined.append(face)
    return refined


def _ordered(faces: list[DetectedFace], order: str) -> tuple[DetectedFace, ...]:
    if order == "left to right":
        key = lambda f: (f.center[0], f.center[1])  # noqa: E731
    elif order == "top to bottom":
        key = lambda f: (f.center[1], f.center[0])  # noqa: E731
    else:
        key = lambda f: (-f.area, f.center[0])  # noqa: E731
    return tuple(sorted(faces, key=key))


def _detect_in_photo(photo: torch.Tensor, settings: DetectionSettings) -> tuple[DetectedFace, ...]:
    height, width = int(photo.shape[0]), int(photo.shape[1])
    pixels = photo.detach().float().clamp(0, 1) * 255
    device = settings.device or torch.device("cpu")
    for attempt in _attempts(height, width):
        found = _mtcnn_pass(
            attempt.make(pixels), settings.threshold, settings.min_face_size * attempt.min_size_scale, device
        )
        doubtful = [not _upright(f) or f.probability < _SURE for f in found]
        faces = [face.mapped(lambda x, y, back=attempt.back: back(x, y, height, width)) for face in found]
        if settings.retry:
            faces = _refined(pixels, faces, doubtful, settings, device)
        faces = [f for f in faces if f.size >= settings.min_face_size]
        if faces or not settings.retry:
            return _ordered(faces, settings.order)
    return ()


def find_faces(images: ImageBatch, settings: DetectionSettings | None = None, what: str = "image") -> Faces:
    """Every face of at least `min_face_size` in each photo, in `settings.order` (a photo where
    nothing is found, even after the retry ladder, gets no faces)."""
    settings = settings or DetectionSettings()
    settings.validate()
    photos = image_list(images, what)
    return Faces(
        tuple(PhotoFaces(int(p.shape[0]), int(p.shape[1]), _detect_in_photo(p, settings)) for p in photos),
        order=settings.order,
    )


def require_faces(
    faces: Faces,
    selection: Sequence[int] | None,
    what: str,
    threshold: float | None = None,
    *,
    faceless_ok: bool = False,
    hint: str = "",
) -> None:
    """Explain the first photo where the selection finds no face (or misses an index).

    faceless_ok: photos without any face pass (they were skipped on purpose upstream); a
    selected index that a photo with faces lacks is still an error. hint: appended to the
    no-face message (what else the user can do)."""
    for i, photo in enumerate(faces.photos):
        where = f"{what} {i + 1} of {len(faces)}"
        if not photo.faces:
            if faceless_ok:
                continue
            setting = f" (MTCNN detection threshold {threshold:g})" if threshold is not None else ""
            raise NoFaceFoundError(
                f"{where}: no face found{setting}. Use a photo where the face is clearly visible, or lower "
                f"the detection threshold{hint}."
            )
        missing = [j for j in (selection or ()) if j >= len(photo.faces)]
        if missing:
            raise PVAError(
                f"{where}: face index {missing[0]} asked for, but only {len(photo.faces)} face(s) found "
                f"(0 is the first in the '{faces.order}' order). Use a face index below {len(photo.faces)}."
            )


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
