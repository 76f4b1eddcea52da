"""Faces cut out of photos at the model's resolution and pasted back, so any sampler graph fits
between the two (Impact Pack's SEGS style: crop -> inpaint -> paste).

Each face gets a square of `context` x its size, in whole photo pixels, moved inside the photo
where it fits, resampled to R x R. Resampling is separable: along each axis one matrix takes the
square's photo pixels to crop pixels (U) and one takes crop pixels back (D). D is the natural
one: the area average of the crop pixels a photo pixel covers when the face was enlarged, linear
interpolation when it was reduced. For an enlarged (or 1:1) face the crop's U is chosen so that
D U = I: U = S (D S)^-1, with S linear interpolation, i.e. the photo sharpened by the inverse of
the round trip's slight blur, then interpolated. So pasting an unchanged crop gives the photo
back to float precision, while the paste of a generated crop is a plain area average. A reduced
face (larger than the crop) loses the detail finer than the crop's resolution, as any crop does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PVAError
from .detection import DetectedFace, Faces, ImageBatch, PhotoFaces, image_list
from .regions import feather_mask, region_mask

SMALL_FACES = ("upscale", "skip")
_MIN_SIDE = 8  # photo pixels: a square smaller than this holds nothing to work with


@dataclass(frozen=True)
class CropSquare:
    """A square of the photo in whole pixels; it can reach past the photo's edges only where
    it is larger than the photo (that part of the crop repeats the edge pixels)."""

    x: int
    y: int
    side: int


@dataclass(frozen=True)
class FaceCrop:
    photo: int  # index of the photo in the IMAGE batch
    face: DetectedFace  # in photo coordinates
    square: CropSquare

    def face_in_crop(self, resolution: int) -> DetectedFace:
        scale = resolution / self.square.side
        x0, y0 = self.square.x, self.square.y
        return self.face.mapped(lambda x, y: ((x - x0) * scale, (y - y0) * scale))


@dataclass(frozen=True, eq=False)
class FaceCrops:
    """The crop info passed from 'Crop Faces (PVA)' to 'Paste Faces (PVA)'."""

    photo_sizes: tuple[tuple[int, int], ...]  # (height, width) of every photo of the batch
    resolution: int  # side of every crop
    crops: tuple[FaceCrop, ...]  # in the order of the crop batch
    masks: torch.Tensor  # [F, R, R] each crop's blend mask (the region it was cut for)
    # No face to crop anywhere: the crop batch holds one stand-in crop (so the sampler graph
    # between the nodes still runs) with an empty mask, and nothing is pasted.
    placeholder: bool = False

    @property
    def count(self) -> int:
        return len(self.crops)

    def faces(self) -> Faces:
        """FACES of the crop batch: each crop is a photo holding its one face."""
        size = self.resolution
        if self.placeholder:
            return Faces((PhotoFaces(size, size, ()),))
        return Faces(tuple(PhotoFaces(size, size, (c.face_in_crop(size),)) for c in self.crops))


def crop_square(face: DetectedFace, context: float, height: int, width: int) -> CropSquare:
    """`context` x the face's size around its centre, moved inside the photo where it fits."""
    side = min(max(round(face.size * context), _MIN_SIDE), max(height, width))
    cx, cy = face.center

    def place(centre: float, length: int) -> int:
        low, high = sorted((0, length - side))  # larger than the photo: cover all of it
        return min(max(round(centre - side / 2), low), high)

    return CropSquare(place(cx, width), place(cy, height), side)


# -- resampling, one axis at a time ---------------------------------------------------------------
def _triangle(at: torch.Tensor, grid: torch.Tensor, support: float) -> torch.Tensor:
    """Rows of linear-interpolation weights (a triangle `support` wide: antialiased when > 1)
    for the points `at` over the pixels `grid`; every point lies inside the grid."""
    weights = (1 - (at[:, None] - grid[None, :]).abs() / support).clamp(min=0)
    return weights / weights.sum(dim=1, keepdim=True)


def _area(first: int, last: int, start: int, scale: float, size: int) -> torch.Tensor:
    """[m, size]: photo pixel i (first <= i < last) as the mean of the crop pixels it covers."""
    lo = (torch.arange(first, last, dtype=torch.float64) - start) / scale
    hi = lo + 1 / scale
    j = torch.arange(size, dtype=torch.float64)
    overlap = (torch.minimum(hi[:, None], j[None] + 1) - torch.maximum(lo[:, None], j[None])).clamp(min=0)
    return overlap / overlap.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class _AxisMaps:
    first: int  # first photo pixel of the square that lies in the photo
    to_crop: torch.Tensor  # U [size, m], float64
    to_photo: torch.Tensor  # D [m, size], float64
    interpolate: torch.Tensor  # S [size, m]: plain interpolation (for masks: no sharpening, stays in 0..1)

    @property
    def pixels(self) -> slice:
        return slice(self.first, self.first + self.to_photo.shape[0])


def _axis_maps(start: int, side: int, length: int, size: int) -> _AxisMaps:
    first, last = max(start, 0), min(start + side, length)
    photo = torch.arange(first, last, dtype=torch.float64)
    crop = torch.arange(size, dtype=torch.float64)
    scale = side / size  # photo pixels per crop pixel
    # crop pixel centres in photo pixel coordinates, clamped into the photo (edge pixels repeat)
    centres = (start + (crop + 0.5) * scale - 0.5).clamp(first, last - 1)
    interpolate = _triangle(centres, photo, max(1.0, scale))
    if scale <= 1:
        to_photo = _area(first, last, start, scale, size)
        # U = S (D S)^-1, so that D U = I
        to_crop = torch.linalg.solve((to_photo @ interpolate).T, interpolate.T).T
    else:
        to_crop = interpolate
        back = ((photo + 0.5 - start) / scale - 0.5).clamp(0, size - 1)
        to_photo = _triangle(back, crop, 1.0)
    return _AxisMaps(first, to_crop, to_photo, interpolate)


def _resample(pixels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ pixels @ cols^T for each channel of [h, w, c] (or [h, w]) pixels, in float64."""
    flat = pixels.double().reshape(pixels.shape[0], pixels.shape[1], -1)
    out = torch.einsum("ai,ijc->ajc", rows, flat)
    out = torch.einsum("ajc,bj->abc", out, cols)
    return out.reshape(rows.shape[0], cols.shape[0], *pixels.shape[2:])


def _maps(crop: FaceCrop, photo_size: tuple[int, int], resolution: int) -> tuple[_AxisMaps, _AxisMaps]:
    height, width = photo_size
    square = crop.square
    return (
        _axis_maps(square.y, square.side, height, resolution),
        _axis_maps(square.x, square.side, width, resolution),
    )


def _cut(photo: torch.Tensor, rows: _AxisMaps, cols: _AxisMaps) -> torch.Tensor:
    return _resample(photo[rows.pixels, cols.pixels], rows.to_crop, cols.to_crop).float()


# -- the two halves ---------------------------------------------------------------------------------
def crop_face(
    photo: torch.Tensor, face: DetectedFace, resolution: int, context: float = 2.0
) -> tuple[torch.Tensor, DetectedFace]:
    """One face's crop [R, R, 3] (values may overshoot 0..1 slightly at hard edges: the
    sharpening) and the face in crop coordinates."""
    info = FaceCrop(0, face, crop_square(face, context, photo.shape[0], photo.shape[1]))
    rows, cols = _maps(info, photo.shape[:2], resolution)
    return _cut(photo, rows, cols), info.face_in_crop(resolution)


def _photo_masks(masks: torch.Tensor | None, photos: list[torch.Tensor], faces: Faces) -> list | None:
    """The photo-sized MASK for each face (faces.pairs() order), from one mask for all photos,
    one per photo, or one per face."""
    if masks is None:
        return None
    masks = masks.unsqueeze(0) if masks.dim() == 2 else masks
    pairs = faces.pairs()
    if masks.dim() != 3:
        raise PVAError(f"mask: expected a MASK [batch, height, width], got shape {list(masks.shape)}.")
    if tuple(masks.shape[1:]) != tuple(photos[0].shape[:2]):
        raise PVAError(
            f"mask: it is {masks.shape[2]}x{masks.shape[1]}, the image {photos[0].shape[1]}x{photos[0].shape[0]}. "
            "Connect a mask made for this image (e.g. 'Face Region Mask (PVA)' from the same faces)."
        )
    count = masks.shape[0]
    if count == len(pairs):
        return list(masks)
    if count == len(photos):
        return [masks[i] for i, _ in pairs]
    if count == 1:
        return [masks[0]] * len(pairs)
    raise PVAError(
        f"mask: {count} masks for {len(photos)} photo(s) with {len(pairs)} face(s); give one mask, one per "
        "photo or one per face."
    )


def crop_faces(
    images: ImageBatch,
    faces: Faces,
    resolution: int,
    context: float = 2.0,
    min_face_size: int = 0,
    small_faces: str = "upscale",
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FaceCrops]:
    """Cut every face of `faces` out of its photo: the crops [F, R, R, 3] and their crop info.

    masks: photo-sized MASK(s) to cut with the faces (one, one per photo or one per face);
    without it each crop's mask is its whole face. Faces smaller than `min_face_size` pixels
    are upscaled like the others or, with small_faces="skip", left out (and left alone)."""
    if resolution < 64 or resolution % 8:
        raise PVAError(
            f"resolution: got {resolution}; use a multiple of 8 of at least 64 (the VAE needs it)."
        )
    if not 1.0 <= context <= 16.0:
        raise PVAError(f"context: got {context}; the crop's side is context x the face size, use 1 to 16.")
    if small_faces not in SMALL_FACES:
        raise PVAError(f"small_faces: must be one of {SMALL_FACES}, got {small_faces!r}.")
    photos = image_list(images, "image")
    faces.check_images(photos, "image")
    photo_masks = _photo_masks(masks, photos, faces)

    crops, infos, crop_masks = [], [], []
    for k, (index, face) in enumerate(faces.pairs()):
        if face.size < min_face_size and small_faces == "skip":
            continue
        photo = photos[index]
        info = FaceCrop(index, face, crop_square(face, context, photo.shape[0], photo.shape[1]))
        rows, cols = _maps(info, photo.shape[:2], resolution)
        crops.append(_cut(photo, rows, cols))
        if photo_masks is None:
            mask = region_mask(info.face_in_crop(resolution), "whole face", resolution, resolution)
        else:
            part = photo_masks[k][rows.pixels, cols.pixels]
            mask = _resample(part, rows.interpolate, cols.interpolate).float().clamp(0, 1)
        crop_masks.append(mask)
        infos.append(info)

    sizes = tuple((int(p.shape[0]), int(p.shape[1])) for p in photos)
    if not infos:
        logging.info("[PVA] Crop Faces: no face to crop; a stand-in crop is passed on and nothing is pasted.")
        stand_in = F.interpolate(
            photos[0].permute(2, 0, 1)[None].float(), size=(resolution, resolution), mode="area"
        )
        empty = torch.zeros(1, resolution, resolution)
        return stand_in[0].permute(1, 2, 0)[None], FaceCrops(sizes, resolution, (), empty, placeholder=True)
    return torch.stack(crops), FaceCrops(sizes, resolution, tuple(infos), torch.stack(crop_masks))


def paste_faces(
    images: ImageBatch,
    crops: torch.Tensor,
    info: FaceCrops,
    masks: torch.Tensor | None = None,
    feather: int = 0,
) -> torch.Tensor:
    """Blend the (sampled) crops back into their photos through their masks, feathered by
    `feather` crop pixels. Every pixel where no mask reaches is the input's, bit for bit."""
    photos = image_list(images, "image")
    sizes = tuple((int(p.shape[0]), int(p.shape[1])) for p in photos)
    if sizes != info.photo_sizes:
        raise PVAError(
            f"image: the crops were cut from {len(info.photo_sizes)} photo(s) of another size or number "
            f"than these {len(sizes)}. Connect the image that went into 'Crop Faces (PVA)'."
        )
    out = [p.clone() for p in photos]
    if info.placeholder:
        return torch.stack(out)
    crops = _crop_batch(crops, info, "crops")
    blend = _crop_batch(masks, info, "mask") if masks is not None else info.masks
    blend = feather_mask(blend.float(), feather)
    for k, crop in enumerate(info.crops):
        rows, cols = _maps(crop, sizes[crop.photo], info.resolution)
        target = out[crop.photo][rows.pixels, cols.pixels]
        pasted = _resample(crops[k], rows.to_photo, cols.to_photo).to(target.dtype)
        weight = _resample(blend[k], rows.to_photo, cols.to_photo).to(target.dtype).clamp(0, 1)[..., None]
        blended = torch.lerp(target, pasted, weight).clamp(0, 1)
        out[crop.photo][rows.pixels, cols.pixels] = torch.where(weight > 0, blended, target)
    return torch.stack(out)


def _crop_batch(batch: torch.Tensor, info: FaceCrops, what: str) -> torch.Tensor:
    """Crops ([F, h, w, 3]) or crop masks ([F or 1, h, w]) at the crop resolution, one per face."""
    is_mask = what == "mask"
    if is_mask and batch.dim() == 2:
        batch = batch[None]
    if batch.dim() != (3 if is_mask else 4):
        raise PVAError(f"{what}: unexpected shape {list(batch.shape)}.")
    count = batch.shape[0]
    if count != info.count and not (is_mask and count == 1):
        raise PVAError(
            f"{what}: {count} given for {info.count} cropped face(s). Keep the batch from 'Crop Faces (PVA)' "
            "in its order, one per face (a sampler's batch_size must stay 1)."
        )
    size = info.resolution
    if tuple(batch.shape[1:3]) != (size, size):
        channels_first = batch[:, None] if is_mask else batch.permute(0, 3, 1, 2)
        resized = F.interpolate(channels_first.float(), size=(size, size), mode="bilinear", antialias=True)
        batch = resized[:, 0] if is_mask else resized.permute(0, 2, 3, 1)
    return batch.expand(info.count, *batch.shape[1:]) if is_mask else batch
