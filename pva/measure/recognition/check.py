"""'Is this still her?': the similarity of result images to a person's references, with a short
summary and the face box and score drawn on each image (the Identity Similarity node)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ...errors import PVAError
from ...faces.detection import image_list
from .alignment import FaceLocator
from .base import Recognizer
from .similarity import Score, reference_features, score_photos

NO_FACE_SCORE = 0.0  # a result without a face keeps nothing of the person


@dataclass(frozen=True)
class IdentityCheck:
    scores: list[Score]
    values: list[float]  # per image; NO_FACE_SCORE where no face was found
    summary: str
    annotated: torch.Tensor  # IMAGE batch with the boxes and scores drawn


def check_identity(
    images: torch.Tensor | list[torch.Tensor],
    recognizer: Recognizer,
    locator: FaceLocator,
    reference_images: torch.Tensor | list[torch.Tensor] | None = None,
    reference_embeddings: torch.Tensor | None = None,
) -> IdentityCheck:
    """Score every image against the references: photos, or embeddings made earlier by the
    same recognizer (an IDENTITY's FaceNet embeddings)."""
    photos = image_list(images, "images")
    if reference_images is not None:
        references = reference_features(recognizer, image_list(reference_images, "reference_images"), locator)
        count = references.shape[0]
        source = f"{count} reference photo{'s' if count != 1 else ''}"
    elif reference_embeddings is not None:
        references = reference_embeddings
        source = f"an IDENTITY of {references.shape[0]} reference faces"
    else:
        raise PVAError(
            "identity similarity: connect reference_images (photos of the person) to compare with."
        )
    scores = score_photos(recognizer, photos, references, locator, "images")
    values = [NO_FACE_SCORE if s.similarity is None else s.similarity for s in scores]
    lines = [f"Identity similarity by {recognizer.label}: cosine to {source}, higher = more alike."]
    for i, score in enumerate(scores):
        if score.similarity is None:
            lines.append(f"image {i + 1}: no face found ({locator.describe()}); scored {NO_FACE_SCORE:g}.")
        else:
            lines.append(
                f"image {i + 1}: {score.similarity:.3f}" + (f", {score.verdict}" if score.verdict else "")
            )
    return IdentityCheck(scores, values, "\n".join(lines), _annotated_batch(photos, scores))


def _annotated_batch(photos: list[torch.Tensor], scores: list[Score]) -> torch.Tensor:
    """One IMAGE batch: photos smaller than the largest are padded (bottom right) with black."""
    height, width = max(p.shape[0] for p in photos), max(p.shape[1] for p in photos)
    out = torch.zeros(len(photos), height, width, 3)
    for i, (photo, score) in enumerate(zip(photos, scores, strict=True)):
        out[i, : photo.shape[0], : photo.shape[1]] = _annotate(photo, score)
    return out


def _annotate(photo: torch.Tensor, score: Score) -> torch.Tensor:
    image = Image.fromarray((photo.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    font = _font(max(12, side // 28))
    width = max(2, side // 200)
    if score.face is None:
        text, colour, where = "no face found", (255, 80, 80), (width * 2, width * 2)
    else:
        x1, y1, x2, y2 = score.face.box
        same = score.verdict is None or score.verdict.startswith("same")
        colour = (80, 220, 120) if same else (255, 170, 60)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{score.similarity:.3f}"
        where = (x1, max(0, y1 - font.getbbox(text)[3] - 2 * width))
    draw.rectangle(draw.textbbox(where, text, font=font), fill=(0, 0, 0))
    draw.text(where, text, fill=colour, font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
