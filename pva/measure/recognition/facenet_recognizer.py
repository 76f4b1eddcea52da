"""FaceNet as a recognizer: the network PVA's identity encoder reads, so its similarity says how
well the result matches what PVA was told, not an independent judgement of identity."""

from __future__ import annotations

import torch

from ...faces.detection import DetectedFace, Faces, PhotoFaces
from ...faces.embeddings import embed_photos
from ...faces.facenet import FaceNet
from .base import Recognizer


class FaceNetRecognizer(Recognizer):
    name = "facenet"
    label = "FaceNet VGGFace2 (conditioning recognizer, not independent)"
    independent = False

    def __init__(self, facenet: FaceNet | torch.nn.Module):
        self.facenet = facenet

    def embed(self, photos: list[torch.Tensor], faces: list[DetectedFace]) -> torch.Tensor:
        # the pack's one path from photos to FaceNet embeddings, with the faces already located
        located = Faces(
            tuple(
                PhotoFaces(int(p.shape[0]), int(p.shape[1]), (f,)) for p, f in zip(photos, faces, strict=True)
            )
        )
        return embed_photos(photos, self.facenet, faces=located, selection=None, require=False).embeddings
