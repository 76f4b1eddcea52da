"""Full-size models of the real architectures with random weights, built once and cached on disk.

No Stable Diffusion checkpoint or FaceNet VGGFace2 weights can be downloaded here, so the
end-to-end tests use files with exactly the real layouts:

- `sd15_inpaint_checkpoint()`: an SD1.5-inpainting checkpoint (UNet with 9 input channels, CLIP-L
  text encoder, SD VAE) assembled from ComfyUI's own classes, fp16, with the key names of a real
  SD1.5 `.safetensors` checkpoint (`model.diffusion_model.`, `cond_stage_model.transformer.
  text_model.`, `first_stage_model.`). About 2.1 GB, built in well under a minute.
- `sd15_inpaint_small_checkpoint()`: the same layout with a smaller UNet (two levels, one res
  block each; 320 channels, so ComfyUI still detects SD1.5-inpainting), about 0.6 GB, for scripts
  that take a checkpoint file and run in several processes at once.
- `facenet_random_weights()`: a randomly initialized facenet-pytorch InceptionResnetV1 state dict,
  its BatchNorm statistics measured on real face crops (so it tells people apart).

The checkpoint is written tensor by tensor (a streaming safetensors writer), one component in
memory at a time. Each file is a cached test model of harness.artefacts (built once, in a process
of its own, checked against its recorded digest); bump a recipe's version whenever its content
changes.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from .artefacts import artefact, ensure, world_seed
from .models import SD15_INPAINT_UNET, SD15_INPAINT_UNET_SMALL, SD_VAE_DDCONFIG, fill_random

# Keys a ComfyUI SDClipModel has but a real SD1.5 checkpoint does not carry.
_CLIP_KEYS_NOT_IN_SD15 = ("transformer.text_projection.weight", "logit_scale")

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


# -- the components ---------------------------------------------------------------------------
def _unet(device: str, config: dict = SD15_INPAINT_UNET) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, dtype=torch.float16, device=device, operations=comfy.ops.disable_weight_init)


def _clip(device: str) -> torch.nn.Module:
    from comfy.sd1_clip import SDClipModel

    return SDClipModel(device=device, dtype=torch.float16)


def _vae(device: str) -> torch.nn.Module:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4).to(torch.float16)


def _clip_extra(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Real SD1.5 checkpoints carry the HF CLIP position_ids buffer (ComfyUI ignores it).
    return {"transformer.text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None]}


# (checkpoint key prefix, builder, keys to drop, extra tensors, seed)
_COMPONENTS: list[tuple[str, Callable[[str], torch.nn.Module], tuple[str, ...], Callable | None, int]] = [
    ("model.diffusion_model.", _unet, (), None, world_seed(1)),
    ("cond_stage_model.", _clip, _CLIP_KEYS_NOT_IN_SD15, _clip_extra, world_seed(2)),
    ("first_stage_model.", _vae, (), None, world_seed(3)),
]


def _component_state(prefix, build, drop, extra, device: str, seed: int | None) -> dict[str, torch.Tensor]:
    module = build(device)
    if seed is not None:
        fill_random(module, seed)
    state = {k: v for k, v in module.state_dict().items() if k not in drop}
    if extra is not None:
        state.update(extra(module))
    return {prefix + k: v for k, v in state.items()}


# -- a streaming safetensors writer -----------------------------------------------------------
def _safetensors_header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def _write_tensor(f, tensor: torch.Tensor) -> None:
    f.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _build_checkpoint(path: Path, components: list = _COMPONENTS) -> None:
    # Pass 1, on the meta device (no memory): every key, dtype and shape, for the header.
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for prefix, build, drop, extra, _seed in components:
        for key, tensor in _component_state(prefix, build, drop, extra, "meta", None).items():
            layout[key] = (tensor.dtype, tuple(tensor.shape))
    metadata = {
        "format": "pt",
        "pva_test_checkpoint": "SD1.5 inpainting layout, random weights",
    }
    with open(path, "wb") as f:
        f.write(_safetensors_header(layout, metadata))
        # Pass 2: one component at a time, filled and streamed in header order.
        for prefix, build, drop, extra, seed in components:
            state = _component_state(prefix, build, drop, extra, "cpu", seed)
            for key in [k for k in layout if k.startswith(prefix)]:
                tensor = state.pop(key)
                if tensor.dtype != layout[key][0] or tuple(tensor.shape) != layout[key][1]:
                    raise RuntimeError(
                        f"{key}: built {tensor.dtype} {list(tensor.shape)}, header says {layout[key]}"
                    )
                _write_tensor(f, tensor)
            if state:
                raise RuntimeError(f"tensors missing from the header: {sorted(state)[:5]}")
            del state
            gc.collect()
        f.flush()
        os.fsync(f.fileno())
    _check_readable(path, layout)


def _check_readable(path: Path, layout: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(layout):
            raise RuntimeError(f"{path}: written keys differ from the layout")
        last = list(layout)[-1]
        if tuple(f.get_slice(last).get_shape()) != layout[last][1]:
            raise RuntimeError(f"{path}: {last} has the wrong shape")


@artefact(
    "sd15-inpainting-random",
    {"version": 1, "seed": world_seed(1), "unet": SD15_INPAINT_UNET, "vae": SD_VAE_DDCONFIG},
)
def _build_sd15_inpaint(path: Path) -> None:
    """The SD1.5-inpainting layout (UNet, CLIP-L, SD VAE), random weights, fp16: 2.1 GB."""
    with torch.inference_mode(False), torch.no_grad():
        _build_checkpoint(path)


def sd15_inpaint_checkpoint() -> Path:
    """Path of the cached random-weight SD1.5-inpainting checkpoint, building it if needed."""
    return ensure("sd15-inpainting-random")


_SMALL_COMPONENTS = [
    (prefix, (lambda device: _unet(device, SD15_INPAINT_UNET_SMALL)) if build is _unet else build, *rest)
    for prefix, build, *rest in _COMPONENTS
]


@artefact(
    "sd15-inpainting-small-random",
    {"version": 1, "seed": world_seed(1), "unet": SD15_INPAINT_UNET_SMALL, "vae": SD_VAE_DDCONFIG},
)
def _build_sd15_inpaint_small(path: Path) -> None:
    """The same layout with a two-level UNet, random weights, fp16: 0.6 GB."""
    with torch.inference_mode(False), torch.no_grad():
        _build_checkpoint(path, _SMALL_COMPONENTS)


def sd15_inpaint_small_checkpoint() -> Path:
    """Path of the cached small-UNet random-weight SD1.5-inpainting checkpoint (about 0.6 GB)."""
    return ensure("sd15-inpainting-small-random")


@artefact(
    "facenet-random",
    {"version": 2, "seed": world_seed(0)},
    suffix=".pt",
)
def _build_facenet(path: Path) -> None:
    """InceptionResnetV1, random weights, BatchNorm statistics measured on real portraits (.pt)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(world_seed(0))
    model = InceptionResnetV1(pretrained=None, classify=False)
    calibrate_batch_norm(model, _real_face_crops())
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


def facenet_random_weights() -> Path:
    """A randomly initialized facenet-pytorch InceptionResnetV1 (512-d embeddings) state dict
    saved as a .pt file of plain tensors, like the real VGGFace2 file (which also has `logits.*`).

    Its BatchNorm statistics are measured on real aligned face crops, as a trained network's are:
    with the default ones (mean 0, variance 1) the random network maps every face to almost the
    same embedding (cosine 0.9999 between the astronaut and another woman; 0.04 calibrated), and
    two people would give the same identity in every end-to-end test."""
    return ensure("facenet-random")


def _real_face_crops() -> torch.Tensor:
    """FaceNet-ready crops of every portrait that ships in installed packages, and their mirror
    images, [N, 3, 160, 160]."""
    from pva.faces.detection import align_faces, find_faces

    from .portraits import TEMPLATE_PHOTOS, portrait

    crops = []
    for name in ("astronaut", *TEMPLATE_PHOTOS):
        photo = torch.from_numpy(portrait(name)).float().div(255)[None]
        crops.append(align_faces(photo, [find_faces(photo).photos[0].faces[0]]))
    crops = torch.cat(crops)
    return torch.cat([crops, crops.flip(-1)])


def calibrate_batch_norm(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of `inputs` (one pass, exact averages)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.inference_mode(False), torch.no_grad():
        model(inputs)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    model.eval()


# Names under which a test server's model folders see the cached files.
SERVER_CHECKPOINT_NAME = "pva-test-sd15-inpainting.safetensors"
SERVER_FACENET_NAME = "pva-test-facenet-random.pt"


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target)


def link_into_models(base: str | os.PathLike) -> dict[str, str]:
    """Symlink the cached checkpoint and FaceNet into a ComfyUI --base-directory's
    models/checkpoints and models/facenet; return the names its loaders list them under."""
    base = Path(base)
    _link(sd15_inpaint_checkpoint(), base / "models/checkpoints" / SERVER_CHECKPOINT_NAME)
    _link(facenet_random_weights(), base / "models/facenet" / SERVER_FACENET_NAME)
    return {"checkpoint": SERVER_CHECKPOINT_NAME, "facenet": SERVER_FACENET_NAME}
