"""FaceNet (Inception-ResNet-v1, VGGFace2): loading from a local file as a ComfyUI-managed model,
and face embedding."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import PVAError, PVAWeightsError
from .detection import FACENET_PYTORCH_MISSING

if TYPE_CHECKING:
    from facenet_pytorch import InceptionResnetV1
WEIGHTS_HINT = "put the FaceNet VGGFace2 weights (20180402-114759-vggface2.pt) in ComfyUI/models/facenet/"


def _unreadable(path: Path, e: Exception) -> PVAWeightsError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return PVAWeightsError(
        f"FaceNet weights file {path} cannot be read; it may be truncated or corrupt "
        f"({e.__class__.__name__}: {first_line[:200]}). Download it again and {WEIGHTS_HINT}."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # weights_only: a .pt file is a pickle, and we never run code from a downloaded file
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise _unreadable(path, e) from e
        raise PVAWeightsError(
            f"FaceNet weights file {path} was refused: it holds Python objects other than tensors "
            f"and is not loaded for safety (weights_only). {WEIGHTS_HINT}. ({e.__class__.__name__})"
        ) from e
    except Exception as e:
        raise _unreadable(path, e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PVAWeightsError(
            f"FaceNet weights file {path} is not a state dict (got {type(state).__name__}). {WEIGHTS_HINT}."
        )
    return state


class FaceNet:
    """The FACENET passed between nodes: InceptionResnetV1 behind a ComfyUI ModelPatcher (as core's
    CLIP vision model), so ComfyUI's model management counts its memory, loads it to the GPU when
    it embeds and offloads it when another model needs the room."""

    def __init__(self, model: InceptionResnetV1):
        from ..host.loading import patcher_for

        self.model = model
        self.patcher = patcher_for(model)

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """[B,512] L2-normalized float32 embeddings of standardized [B,3,H,W] face crops (CPU)."""
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.patcher)
        return embed_faces(self.model, crops).cpu()


def load_facenet(path: str | os.PathLike) -> FaceNet:
    """FaceNet (512-d embeddings) from a local .pt or .safetensors, frozen, in eval mode, under
    ComfyUI's model management."""
    return FaceNet(load_facenet_model(path))


def load_facenet_model(path: str | os.PathLike) -> InceptionResnetV1:
    """The bare InceptionResnetV1 from a local .pt or .safetensors (scripts that run without
    ComfyUI's model management, e.g. dataset preprocessing workers)."""
    path = Path(path)
    if not path.is_file():
        raise PVAWeightsError(f"FaceNet weights file {path} not found: {WEIGHTS_HINT}.")
    # The official file carries the 8631-class VGGFace2 classifier; embeddings don't use it.
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("logits.")}

    # imported here so the pack still loads (and can explain) when facenet-pytorch is missing
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as e:
        raise PVAError(FACENET_PYTORCH_MISSING) from e

    model = InceptionResnetV1(classify=False)
    expected = model.state_dict()
    # BatchNorm step counters are bookkeeping, not weights; older files may lack them.
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state]
    mismatched = [
        f"{k}: file {list(state[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of {len(required)} keys missing (e.g. {missing[0]})")
        if mismatched:
            problems.append(f"{len(mismatched)} keys with the wrong shape (e.g. {mismatched[0]})")
        raise PVAWeightsError(
            f"FaceNet weights file {path} is not an InceptionResnetV1 (FaceNet) state dict: "
            f"{'; '.join(problems)}. {WEIGHTS_HINT}."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.eval().requires_grad_(False)
    return model


def embed_faces(facenet: torch.nn.Module, crops: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """[B,512] L2-normalized float32 embeddings of standardized [B,3,H,W] face crops, on the
    crops' device. `grad` keeps the graph (pretraining stage 2 trains FaceNet)."""
    if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[0] == 0:
        raise PVAError(f"face crops: got shape {list(crops.shape)}, expected [batch, 3, height, width].")
    param = next(facenet.parameters())
    with torch.set_grad_enabled(grad):
        emb = facenet(crops.to(param.device, param.dtype))
    # normalize again in float32: the model's own normalization may have run in half precision
    return F.normalize(emb.float(), dim=1).to(crops.device)
