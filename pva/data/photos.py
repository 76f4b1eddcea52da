"""The one reader of a dataset's pictures (preprocessing, pretraining samples and evaluation all
read through it): photos upright, with their EXIF orientation applied as ComfyUI's LoadImage
does, and masks by one rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PVAError

# A mask of another size than its photo is taken (resized, nearest) when its aspect ratio is the
# photo's within this fraction: an export at another resolution. Anything else is refused.
MASK_ASPECT_TOLERANCE = 0.01


def _read(path: Path, mode: str, what: str) -> np.ndarray:
    """[H, W(, C)] float 0..1 pixels of an image file, upright, in PIL `mode`."""
    path = Path(path)
    if not path.is_file():
        raise PVAError(f"{what} {path} does not exist; the dataset or its split file names a missing file.")
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise PVAError(f"{what} {path} cannot be read as an image ({error}).") from None


def read_photo(path: str | Path, what: str = "photo") -> torch.Tensor:
    """[H, W, 3] float 0..1 RGB, upright."""
    return torch.from_numpy(_read(Path(path), "RGB", what).copy())


def read_mask(path: str | Path, size: tuple[int, int], photo: str | Path) -> torch.Tensor:
    """[H, W] 0/1 (1 = inpaint here, as CelebAHQ-IDI's masks) at the photo's (upright) size."""
    mask = _read(Path(path), "L", f"mask (for {photo})")
    height, width = size
    if mask.shape != (height, width):
        ratio = (mask.shape[1] / mask.shape[0]) / (width / height)
        if abs(ratio - 1) > MASK_ASPECT_TOLERANCE:
            raise PVAError(
                f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its photo {photo} is {width}x{height} (upright): "
                "a mask must have its photo's shape (the same size, or the same aspect ratio at another size)."
            )
        resized = Image.fromarray((mask * 255).round().astype(np.uint8)).resize(
            (width, height), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy((mask > 0.5).astype(np.float32))
