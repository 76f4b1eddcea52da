"""Reference photos of one person, a photo to inpaint and its face mask, from a real photo.

All are made from scikit-image's `astronaut()` (512x512 RGB, one face that MTCNN finds with
probability ~0.99999), saved as PNGs into a ComfyUI input folder, and loaded in API prompts by
core nodes only (LoadImage, ImageBatch, LoadImageMask), as a user's workflow would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE_SIZE = 512
# The face in astronaut() as MTCNN finds it, as fractions of the photo's side:
# box x 181..268, y 62..172 at 512x512 (x 91..134, y 32..88 at 256x256).
FACE_BOX = (181 / 512, 62 / 512, 268 / 512, 172 / 512)


def astronaut() -> np.ndarray:
    """[512, 512, 3] uint8."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS))


def reference_photos() -> list[np.ndarray]:
    """Three 512x512 photos of "one person": the original, its mirror image, and a shifted,
    enlarged crop with slightly warmer colours (a different framing and white balance)."""
    original = astronaut()
    flipped = np.ascontiguousarray(original[:, ::-1])
    crop = original[24:472, 40:488]  # 448x448, face off-centre, then scaled up to 512
    warm = _resize(crop, REFERENCE_SIZE).astype(np.float32) * np.array([1.06, 1.0, 0.92], dtype=np.float32)
    warm = np.clip(np.round(warm), 0, 255).astype(np.uint8)
    return [original, flipped, warm]


def faceless_photo(size: int = REFERENCE_SIZE) -> np.ndarray:
    """A flat grey photo: MTCNN cannot find a face in it."""
    return np.full((size, size, 3), 128, dtype=np.uint8)


def target_photo(size: int = 256) -> np.ndarray:
    """The photo to inpaint: astronaut() at size x size, [size, size, 3] uint8."""
    return _resize(astronaut(), size)


def face_mask(size: int = 256, grow: float = 0.15) -> np.ndarray:
    """[size, size] bool: an ellipse over the face (the box grown by `grow` on each side)."""
    x1, y1, x2, y2 = (v * size for v in FACE_BOX)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = (x2 - x1) / 2 * (1 + 2 * grow), (y2 - y1) / 2 * (1 + 2 * grow)
    ys = (np.arange(size) + 0.5 - cy) / ry
    xs = (np.arange(size) + 0.5 - cx) / rx
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """A bool mask dilated by `pixels` (square neighbourhood): the band where a pasted-back
    inpainting may blend into the photo."""
    out = mask.copy()
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def save_png(pixels: np.ndarray, folder: Path, name: str) -> str:
    """Save uint8 pixels ([H,W,3] RGB or [H,W] grey) as folder/name; return the name."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    return name


def write_references(input_dir: Path, prefix: str = "pva-ref") -> list[str]:
    """Save the reference photos into a ComfyUI input folder; return their file names."""
    return [save_png(p, input_dir, f"{prefix}-{i + 1}.png") for i, p in enumerate(reference_photos())]


def write_inpaint_inputs(input_dir: Path, size: int = 256, prefix: str = "pva-target") -> tuple[str, str]:
    """Save the photo to inpaint and its face mask (white = inpaint, a greyscale PNG);
    return (image name, mask name)."""
    image = save_png(target_photo(size), input_dir, f"{prefix}-{size}.png")
    mask = save_png(face_mask(size).astype(np.uint8) * 255, input_dir, f"{prefix}-{size}-mask.png")
    return image, mask


def load_image_batch(names: list[str], node_prefix: str = "ref") -> tuple[dict, list]:
    """API-prompt nodes loading `names` as one IMAGE batch: LoadImage per file, chained through
    ImageBatch (which resizes each later image to the first one's size).

    Returns (nodes, [node_id, output_index]) of the batch."""
    if not names:
        raise ValueError("no reference images")
    nodes: dict = {}
    batch: list | None = None
    for i, name in enumerate(names):
        load_id = f"{node_prefix}_load_{i}"
        nodes[load_id] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if batch is None:
            batch = [load_id, 0]
        else:
            batch_id = f"{node_prefix}_batch_{i}"
            nodes[batch_id] = {
                "class_type": "ImageBatch",
                "inputs": {"image1": batch, "image2": [load_id, 0]},
            }
            batch = [batch_id, 0]
    return nodes, batch


def load_mask(name: str, node_id: str = "mask") -> tuple[dict, list]:
    """API-prompt node loading a greyscale mask PNG as a MASK (white = 1)."""
    return {node_id: {"class_type": "LoadImageMask", "inputs": {"image": name, "channel": "red"}}}, [
        node_id,
        0,
    ]
