"""The interface every face recognizer implements, and the one similarity they all report.

Similarity is the cosine of two recognizer features, as in the paper (ID similarity = cosine of
CosFace features of the result and the ground truth). Recognizers differ in how they crop the
face (each its own training alignment) and in their feature space, so scores are comparable
within one recognizer, not across recognizers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ...faces.detection import DetectedFace


class Recognizer(ABC):
    name: str  # short id used in reports and options, e.g. "dlib"
    label: str  # what a reader needs to know, e.g. "dlib ResNet (independent of PVA)"
    independent: bool = True  # False: PVA was conditioned on this recognizer's features

    @abstractmethod
    def embed(self, photos: list[torch.Tensor], faces: list[DetectedFace]) -> torch.Tensor:
        """[F, D] float32 features (not normalized) of face i in [H,W,3] 0..1 photo i."""

    def verdict(self, features: torch.Tensor, references: torch.Tensor) -> str | None:
        """A same-person judgement by the recognizer's own documented rule, if it has one."""
        return None


def cosine(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[N] cosine similarity of one [D] feature to each of [N, D] references."""
    return F.normalize(references.float(), dim=-1) @ F.normalize(features.float(), dim=-1)
