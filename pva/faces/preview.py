"""A picture of what detection found: every face's box, landmarks and number, so a user can
choose faces by index. Selected faces are drawn in colour, the others in grey."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .detection import DetectedFace, Faces, ImageBatch, image_list

_SELECTED = (40, 220, 90)
_NOT_SELECTED = (170, 170, 170)
_NO_FACE = (235, 50, 50)
_LANDMARK_COLOURS = ((60, 140, 255), (60, 140, 255), (255, 200, 40), (255, 80, 200), (255, 80, 200))


def preview_faces(images: ImageBatch, found: Faces, selection: Sequence[int] | None) -> torch.Tensor:
    """The photos with the faces drawn on them, [B, H, W, 3] in 0..1 (photos of different sizes
    are returned at the first one's size, as ComfyUI's IMAGE is one tensor)."""
    photos = image_list(images, "image")
    drawn = [_draw(photo, faces.faces, selection) for photo, faces in zip(photos, found.photos, strict=True)]
    height, width = drawn[0].shape[:2]
    same = [d if d.shape[:2] == (height, width) else _resized(d, height, width) for d in drawn]
    return torch.from_numpy(np.stack(same)).float().div(255)


def _resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))


def _draw(photo: torch.Tensor, faces: Sequence[DetectedFace], selection: Sequence[int] | None) -> np.ndarray:
    pixels = (photo.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    height, width = pixels.shape[:2]
    line = max(2, round(min(height, width) / 250))
    font = ImageFont.load_default(size=max(14, round(min(height, width) / 30)))
    if not faces:
        draw.text(
            (line * 3, line * 3), "no face found", fill=_NO_FACE, font=font, stroke_width=2, stroke_fill=0
        )
    for index, face in enumerate(faces):
        colour = _SELECTED if selection is None or index in selection else _NOT_SELECTED
        x1, y1, x2, y2 = face.box
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        dot = max(line, round(face.size / 40))
        for (x, y), dot_colour in zip(face.landmarks, _LANDMARK_COLOURS, strict=True):
            draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=dot_colour)
        label = f"{index}  {face.probability:.2f}"
        _, top, _, bottom = draw.textbbox((0, 0), label, font=font, stroke_width=2)
        above = y1 - (bottom - top) - 2 * line
        text_y = above if above >= 0 else y2 + line  # below the box when there is no room above
        draw.text((x1, text_y), label, fill=colour, font=font, stroke_width=2, stroke_fill=0)
    return np.asarray(image)
