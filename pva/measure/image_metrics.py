"""Image quality as in the paper: FID and KID (KID reported x 1000) between results and their
ground-truth photos, on Inception-v3 pool features.

- The network: torch-fidelity's Inception-v3 port of the TF 2015-12-05 FID weights (the network
  behind clean-fid, torchmetrics and the original TTUR code), from a local weights file the user
  gives (`pt_inception-2015-12-05-6726825d.pth`, or a .safetensors conversion); torchmetrics'
  variant that resizes to 299 with antialiasing (as clean-fid's protocol does, with bilinear
  instead of PIL bicubic filtering). Nothing is downloaded unless the user allows it.
- The statistics: torchmetrics' FID (float64, eigenvalue matrix square root) and KID (unbiased
  polynomial-kernel MMD over random subsets). KID's subsets are min(1000, n) images, as clean-fid
  does, so it works with fewer images than the usual subset size; seeded, so it repeats exactly.

Features are computed once per image set and can be kept: the metrics take feature matrices.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import PVAError, PVAWeightsError
from ..optional import require

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, 3, H, W] -> [N, D]
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
INCEPTION_HINT = (
    "give the Inception-v3 FID weights torch-fidelity uses (pt_inception-2015-12-05-6726825d.pth, "
    "from its GitHub release page) as a local file"
)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .pth is a pickle, and a downloaded file must not run code
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PVAWeightsError(f"Inception weights {path}: not a state dict of tensors; {INCEPTION_HINT}.")
    return state


def download_inception() -> Path:
    """torch-fidelity's own download of its weights into torch's hub cache (only when a user
    allows downloads; the file is then read like a local one)."""
    from torch.hub import download_url_to_file, get_dir

    url = require("torch_fidelity.feature_extractor_inceptionv3").URL_INCEPTION_V3
    target = Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, str(target))
    return target


def load_inception(path: str | os.PathLike) -> torch.nn.Module:
    """Inception-v3 (2048-d pool features) from a local weights file, on the CPU, eval mode."""
    path = Path(path)
    if not path.is_file():
        raise PVAWeightsError(f"Inception weights {path} not found: {INCEPTION_HINT}.")
    require("torch_fidelity")
    fid_module = require("torchmetrics.image.fid")
    try:
        state = _read_tensors(path)
    except PVAWeightsError:
        raise
    except Exception as error:
        raise PVAWeightsError(
            f"Inception weights {path} cannot be read ({error}); {INCEPTION_HINT}."
        ) from None
    # torch-fidelity reads its weights with torch.load(weights_only=False). It gets a copy of the
    # tensors checked above, serialized here, so it never unpickles the user's file itself.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        model = fid_module.NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=buffer
        )
    except RuntimeError as error:  # load_state_dict: missing keys or wrong shapes
        first = str(error).strip().splitlines()[0]
        raise PVAWeightsError(
            f"Inception weights {path} do not fit torch-fidelity's Inception-v3 ({first[:200]}); {INCEPTION_HINT}."
        ) from None
    return model.eval()


def image_features(
    images: Sequence[torch.Tensor], extractor: FeatureExtractor, batch_size: int = 16, what: str = "images"
) -> torch.Tensor:
    """[N, D] float64 features of [H,W,3] 0..1 images (any sizes: each is given to the network
    alone unless the batch shares a size)."""
    if len(images) == 0:
        raise PVAError(f"{what}: the set is empty; there is nothing to measure.")
    parts = []
    device = _device_of(extractor)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            groups: dict[tuple, list[torch.Tensor]] = {}
            for image in chunk:
                if image.dim() != 3 or image.shape[-1] != 3:
                    raise PVAError(
                        f"{what}: expected [height, width, 3] images, got shape {list(image.shape)}."
                    )
                groups.setdefault(tuple(image.shape), []).append(image)
            # one call per size; order restored below
            out: dict[int, torch.Tensor] = {}
            for shape, members in groups.items():
                batch = torch.stack(members).clamp(0, 1).mul(255).round().byte().permute(0, 3, 1, 2)
                features = extractor(batch.to(device)).double().cpu().reshape(len(members), -1)
                indices = [i for i, image in enumerate(chunk) if tuple(image.shape) == shape]
                out.update(zip(indices, features, strict=True))
            parts.append(torch.stack([out[i] for i in range(len(chunk))]))
    return torch.cat(parts)


def _device_of(extractor: FeatureExtractor) -> torch.device:
    if isinstance(extractor, torch.nn.Module):
        parameter = next(extractor.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


class _Given(torch.nn.Module):
    """Hands torchmetrics features computed earlier (it expects a feature network)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_pair(real: torch.Tensor, fake: torch.Tensor, minimum: int, metric: str) -> None:
    for name, features in (("ground-truth", real), ("result", fake)):
        if features.dim() != 2 or features.shape[0] < minimum:
            raise PVAError(
                f"{metric}: needs at least {minimum} {name} images, got {features.shape[0] if features.dim() else 0}."
            )
    if real.shape[1] != fake.shape[1]:
        raise PVAError(
            f"{metric}: feature sizes differ ({real.shape[1]} vs {fake.shape[1]}); use one extractor."
        )


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two [N, D] feature sets."""
    _check_pair(real, fake, 2, "FID")
    metric = require("torchmetrics.image.fid").FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    value = float(metric.compute())
    return max(value, 0.0) if math.isfinite(value) else value  # tiny negatives are round-off


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of the unbiased KID over `subsets` random subsets of min(max_subset_size, n)
    images of each set. Multiply by 1000 for the paper's unit."""
    _check_pair(real, fake, 2, "KID")
    size = min(max_subset_size, real.shape[0], fake.shape[0])
    if size == real.shape[0] == fake.shape[0]:
        subsets = 1  # every subset would be both whole sets: the same value each time
    with warnings.catch_warnings():  # "will save all extracted features": they are given, not extracted
        warnings.simplefilter("ignore", UserWarning)
        metric = require("torchmetrics.image.kid").KernelInceptionDistance(
            feature=_Given(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the subsets are drawn with torch's global generator
        mean, std = metric.compute()
    return float(mean), float(std)
