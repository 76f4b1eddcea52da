"""Evaluation in the paper's format: inpaint a test split with and without PVA, measure identity
(several recognizers), image quality (FID / KID) and text control (CLIP score), write a report."""

from .generate import EvaluationModels
from .run import cached_faces, evaluate, load_models, measure
from .scoring import MetricTools
from .settings import DEFAULT_MASK_TYPES, METHODS, RESEARCH_EDITS, EvaluationSettings

__all__ = [
    "DEFAULT_MASK_TYPES",
    "METHODS",
    "RESEARCH_EDITS",
    "EvaluationModels",
    "EvaluationSettings",
    "MetricTools",
    "cached_faces",
    "evaluate",
    "load_models",
    "measure",
]
