"""Face recognizers behind one interface (detect or take the aligned crop, align, embed, cosine
similarity): FaceNet (the recognizer PVA is conditioned on, so not independent), dlib's ResNet
and ArcFace/CosFace ONNX models (independent). Optional packages are imported on use."""

from .alignment import ALIGNED_CROP, FACE_MODES, FaceLocator, aligned_face
from .base import Recognizer, cosine
from .load import RECOGNIZER_NAMES, load_recognizer
from .similarity import Located, Score, locate_and_embed, reference_features, score_photos

__all__ = [
    "ALIGNED_CROP",
    "FACE_MODES",
    "RECOGNIZER_NAMES",
    "FaceLocator",
    "Located",
    "Recognizer",
    "Score",
    "aligned_face",
    "cosine",
    "load_recognizer",
    "locate_and_embed",
    "reference_features",
    "score_photos",
]
