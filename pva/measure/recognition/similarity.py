"""Identity similarity of photos to a person's references, with any recognizer: locate the face,
embed it, cosine to each reference, averaged. Used by the Identity Similarity node and by the
evaluation harness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import NoFaceFoundError, PVAError
from ...faces.detection import DetectedFace
from .alignment import FaceLocator
from .base import Recognizer, cosine


@dataclass(frozen=True)
class Located:
    """The face of each photo and its recognizer features (None where no face was found)."""

    faces: list[DetectedFace | None]
    features: list[torch.Tensor | None]

    @property
    def missing(self) -> list[int]:
        return [i for i, f in enumerate(self.features) if f is None]


def locate_and_embed(
    recognizer: Recognizer, photos: list[torch.Tensor], locator: FaceLocator, what: str = "image"
) -> Located:
    faces = locator.locate(photos, what=f"{what}s")
    found = [i for i, face in enumerate(faces) if face is not None]
    features: list[torch.Tensor | None] = [None] * len(photos)
    if found:
        embedded = recognizer.embed([photos[i] for i in found], [faces[i] for i in found])
        for row, i in enumerate(found):
            features[i] = embedded[row]
    return Located(faces, features)


def reference_features(
    recognizer: Recognizer, photos: list[torch.Tensor], locator: FaceLocator, what: str = "reference photo"
) -> torch.Tensor:
    """[N, D] features of the references; a reference without a face is an error naming it."""
    if not photos:
        raise PVAError(f"{what}s: none given; connect at least one photo of the person.")
    located = locate_and_embed(recognizer, photos, locator, what)
    if located.missing:
        i = located.missing[0]
        raise NoFaceFoundError(
            f"{what} {i + 1} of {len(photos)}: no face found ({locator.describe()}). Use a photo where the "
            "face is clearly visible, or lower the detection threshold."
        )
    return torch.stack([f for f in located.features if f is not None])


@dataclass(frozen=True)
class Score:
    face: DetectedFace | None  # where the face was found in the photo; None: no face
    similarity: float | None  # mean cosine similarity to the references; None: no face
    verdict: str | None = None  # the recognizer's own same-person rule, where it has one


def score_photos(
    recognizer: Recognizer,
    photos: list[torch.Tensor],
    references: torch.Tensor,
    locator: FaceLocator,
    what: str = "image",
) -> list[Score]:
    located = locate_and_embed(recognizer, photos, locator, what)
    scores = []
    for face, features in zip(located.faces, located.features, strict=True):
        if features is None:
            scores.append(Score(None, None))
        else:
            similarity = float(cosine(features, references).mean())
            scores.append(Score(face, similarity, recognizer.verdict(features, references)))
    return scores
