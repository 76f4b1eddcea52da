"""ArcFace / CosFace recognizers exported to ONNX (e.g. insightface's glintr100.onnx from the
antelopev2 pack: a CosFace ResNet-100 trained on Glint360K, the closest public match to the
paper's evaluation network), run with onnxruntime from a file the user gives.

Input convention (insightface's): a 5-point similarity-aligned RGB crop on the ArcFace template
at the model's input size (112x112), scaled to -1..1 as (x - 127.5) / 127.5. Models that
normalize inside their graph (a Sub and a Mul among the first nodes) get 0..255 instead."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from ...errors import PVAError, PVAWeightsError
from ...faces.detection import DetectedFace
from ...optional import missing_message, require
from .alignment import arcface_crop
from .base import Recognizer

_sessions: dict[tuple, object] = {}
_lock = threading.Lock()


def _normalizes_itself(path: Path) -> bool:
    try:
        import onnx
    except ImportError:
        logging.warning(
            "comfyui-pva: %s; assuming %s takes -1..1 pixels.", missing_message("onnx"), path.name
        )
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    first = [f"{node.op_type}|{node.name}" for node in graph.node[:8]]
    return any(f.startswith("Sub") or "|Sub" in f for f in first) and any(
        f.startswith("Mul") or "|Mul" in f for f in first
    )


class OnnxRecognizer(Recognizer):
    independent = True

    def __init__(self, path: str | Path, device: str = "cpu"):
        ort = require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise PVAWeightsError(
                f"ONNX face recognizer {path} not found. Put an ArcFace/CosFace .onnx file (e.g. "
                "glintr100.onnx from insightface's antelopev2) in ComfyUI/models/face_recognition/ or give its path."
            )
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, tuple(providers))
        try:
            with _lock:
                if key not in _sessions:
                    _sessions[key] = (
                        ort.InferenceSession(str(path), providers=providers),
                        _normalizes_itself(path),
                    )
                self.session, self.raw_pixels = _sessions[key]
        except PVAError:
            raise
        except Exception as error:  # onnxruntime / protobuf raise their own types for bad files
            raise PVAWeightsError(f"ONNX face recognizer {path} cannot be loaded ({error}).") from None
        inputs = self.session.get_inputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3:
            raise PVAWeightsError(
                f"ONNX face recognizer {path.name}: expected one input of shape [batch, 3, height, width] "
                f"(an ArcFace-style model), got {[(i.name, i.shape) for i in inputs]}."
            )
        self.input_name = inputs[0].name
        self.size = shape[2] if isinstance(shape[2], int) else 112
        self.batch = shape[0] if isinstance(shape[0], int) else None  # None: any batch size
        self.name = f"onnx:{path.name}"
        self.label = f"{path.name} (ONNX, independent of PVA)"

    def embed(self, photos: list[torch.Tensor], faces: list[DetectedFace]) -> torch.Tensor:
        crops = torch.stack([arcface_crop(p, f, self.size) for p, f in zip(photos, faces, strict=True)]) * 255
        if not self.raw_pixels:
            crops = (crops - 127.5) / 127.5
        batch = crops.numpy().astype(np.float32)
        step = self.batch or len(batch)
        outputs = [
            self.session.run(None, {self.input_name: batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        features = np.concatenate(outputs).reshape(len(batch), -1)
        return torch.from_numpy(features.astype(np.float32))
