"""dlib's ResNet face recognizer (128-d descriptors; 99.38% on LFW), independent of PVA.

Its weights ship inside the `face-recognition-models` package; they are found on disk without
importing that package (its __init__ imports pkg_resources, which recent setuptools no longer
has). The face is located by the pack's detector (or the aligned crop); dlib's 5-point shape
predictor then finds the landmarks dlib aligns its 150x150 chip with. The 68-point predictor in
the same package is not used: its licence forbids commercial use."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch

from ...errors import PVAError, PVAWeightsError
from ...faces.detection import DetectedFace
from ...optional import missing_message, require
from .base import Recognizer

RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"
# dlib's documented rule: descriptors of the same person are less than 0.6 apart (Euclidean).
SAME_PERSON_DISTANCE = 0.6

_lock = threading.Lock()  # dlib's models are not documented as thread-safe


def models_folder() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PVAError(missing_message("face_recognition_models"))
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibRecognizer(Recognizer):
    name = "dlib"
    label = "dlib ResNet 128-d (independent of PVA)"

    def __init__(self, folder: str | Path | None = None):
        dlib = require("dlib")
        folder = Path(folder) if folder is not None else models_folder()
        paths = [folder / RECOGNIZER_FILE, folder / SHAPE_FILE]
        for path in paths:
            if not path.is_file():
                raise PVAWeightsError(
                    f"dlib recognizer: {path} not found. Reinstall face-recognition-models "
                    "(`pip install --no-deps --force-reinstall face-recognition-models==0.3.0`)."
                )
        try:
            self.recognizer = dlib.face_recognition_model_v1(str(paths[0]))
            self.shapes = dlib.shape_predictor(str(paths[1]))
        except RuntimeError as error:
            raise PVAWeightsError(f"dlib recognizer: {folder} holds damaged model files ({error}).") from None
        self._dlib = dlib

    def embed(self, photos: list[torch.Tensor], faces: list[DetectedFace]) -> torch.Tensor:
        descriptors = []
        with _lock:
            for photo, face in zip(photos, faces, strict=True):
                pixels = np.ascontiguousarray(
                    (photo.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
                )
                height, width = pixels.shape[:2]
                x1, y1, x2, y2 = face.box
                rect = self._dlib.rectangle(
                    max(0, round(x1)),
                    max(0, round(y1)),
                    min(width - 1, round(x2)),
                    min(height - 1, round(y2)),
                )
                shape = self.shapes(pixels, rect)
                descriptors.append(np.asarray(self.recognizer.compute_face_descriptor(pixels, shape)))
        return torch.tensor(np.stack(descriptors), dtype=torch.float32)

    def verdict(self, features: torch.Tensor, references: torch.Tensor) -> str:
        distance = float((references.float() - features.float()).norm(dim=-1).mean())
        same = distance < SAME_PERSON_DISTANCE
        return (
            f"{'same person' if same else 'different person'} by dlib's rule "
            f"(mean distance {distance:.3f} {'<' if same else '>='} {SAME_PERSON_DISTANCE})"
        )
