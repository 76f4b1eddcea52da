"""The one path from photos to face embeddings: detect (or take given FACES), select, align,
embed with FaceNet. Every node and script that needs an identity from photos calls this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .detection import (
    DetectionSettings,
    Faces,
    ImageBatch,
    align_faces,
    find_faces,
    image_list,
    require_faces,
)
from .facenet import FaceNet, embed_faces

# Faces embedded per FaceNet call: bounds memory for large photo sets.
_CHUNK = 64


@dataclass(frozen=True)
class EmbeddedFaces:
    """The faces used and their FaceNet embeddings, face by face in `faces.pairs()` order."""

    faces: Faces
    embeddings: torch.Tensor  # [F, 512], L2-normalized, CPU
    crops: torch.Tensor  # [F, 3, 160, 160] the aligned crops FaceNet saw (standardized)
    mirrored: torch.Tensor | None = None  # [F, 512] of the mirror images, when asked for

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]


def embed_photos(
    images: ImageBatch,
    facenet: FaceNet | torch.nn.Module,
    *,
    faces: Faces | None = None,
    detection: DetectionSettings | None = None,
    selection: Sequence[int] | None = (0,),
    mirrored: bool = False,
    require: bool = True,
    what: str = "reference photo",
) -> EmbeddedFaces:
    """Embed the selected faces of every photo.

    faces: FACES found earlier in these photos (e.g. by 'Detect Faces (PVA)'); else detected here
    with `detection`. selection: face indices in each photo's order (None = every face).
    require: a photo without a selected face is an error naming it ("reference photo 2 of 3:
    no face found ..."); otherwise it just contributes no face."""
    detection = detection or DetectionSettings()
    photos = image_list(images, f"{what}s")
    if faces is None:
        faces = find_faces(photos, detection, what=f"{what}s")
    else:
        faces.check_images(photos, f"{what}s")
    if require:
        require_faces(faces, selection, what, detection.threshold)
    chosen = faces.select(selection)
    pairs = chosen.pairs()
    if not pairs:
        empty = torch.zeros(0, 512)
        return EmbeddedFaces(chosen, empty, torch.zeros(0, 3, 160, 160), empty if mirrored else None)
    crops = align_faces([photos[i] for i, _ in pairs], [face for _, face in pairs])
    embeddings = _embed(facenet, crops)
    return EmbeddedFaces(chosen, embeddings, crops, _embed(facenet, crops.flip(-1)) if mirrored else None)


def _embed(facenet: FaceNet | torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    parts = []
    for start in range(0, crops.shape[0], _CHUNK):
        chunk = crops[start : start + _CHUNK]
        parts.append(
            facenet.embed(chunk) if isinstance(facenet, FaceNet) else embed_faces(facenet, chunk).cpu()
        )
    return torch.cat(parts)
