"""Optional packages (the pack's `eval` extra): imported where they are used, and when one is
missing the user is told what it is for and how to install it without touching torch or numpy."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import PVAError

EVAL_EXTRA = "`pip install -e .[eval]` in this pack's folder"
# module -> (what needs it, how to install it). dlib-bin and face-recognition-models declare no
# dependencies; --no-deps keeps it that way should a later release start pinning numpy.
OPTIONAL = {
    "dlib": (
        "the dlib face recognizer",
        "`pip install --no-deps dlib-bin==20.0.1.post1 face-recognition-models==0.3.0`",
    ),
    "face_recognition_models": (
        "the dlib face recognizer's weights",
        "`pip install --no-deps face-recognition-models==0.3.0`",
    ),
    "onnxruntime": ("ONNX face recognizers (ArcFace/CosFace)", "`pip install onnxruntime==1.31.1`"),
    "onnx": ("reading an ONNX face recognizer's input convention", "`pip install onnx==1.23.2`"),
    "torchmetrics": ("FID and KID", "`pip install torchmetrics==1.9.0 torch-fidelity==0.4.0`"),
    "torch_fidelity": ("the Inception-v3 network of FID and KID", "`pip install torch-fidelity==0.4.0`"),
    "transformers": ("CLIP score", "`pip install transformers` (ComfyUI already requires it)"),
}


def missing_message(module: str) -> str:
    module = module.split(".")[0]
    purpose, install = OPTIONAL[module]
    return (
        f"{module} is not installed; it is needed for {purpose}. Install it with {install} "
        f"(it keeps your torch and numpy), or all evaluation packages with {EVAL_EXTRA}."
    )


def require(module: str) -> ModuleType:
    """Import an optional package (or one of its modules), or raise a PVAError that says how
    to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PVAError(missing_message(module)) from error
