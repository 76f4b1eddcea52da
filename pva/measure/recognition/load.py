"""Recognizers by name: "dlib", "facenet" (needs a loaded FaceNet) or "onnx:<path>"."""

from __future__ import annotations

import threading

import torch

from ...errors import PVAError
from ...faces.facenet import FaceNet
from .base import Recognizer

RECOGNIZER_NAMES = ("dlib", "facenet", "onnx:<path to an ArcFace/CosFace .onnx>")
_dlib: list[Recognizer] = []  # loaded once per process (about half a second)
_lock = threading.Lock()


def load_recognizer(
    name: str, facenet: FaceNet | torch.nn.Module | None = None, device: str = "cpu"
) -> Recognizer:
    if name == "dlib":
        from .dlib_recognizer import DlibRecognizer

        with _lock:
            if not _dlib:
                _dlib.append(DlibRecognizer())
            return _dlib[0]
    if name == "facenet":
        if facenet is None:
            raise PVAError(
                "recognizer facenet: connect a FACENET ('Load FaceNet (PVA)') or give its weights file."
            )
        from .facenet_recognizer import FaceNetRecognizer

        return FaceNetRecognizer(facenet)
    if name.startswith("onnx:"):
        from .onnx_recognizer import OnnxRecognizer

        return OnnxRecognizer(name[len("onnx:") :], device=device)
    raise PVAError(f"recognizer: {name!r} is not one of {RECOGNIZER_NAMES}.")
