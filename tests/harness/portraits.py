"""Real face photos that ship inside installed packages (no download needed).

- scikit-image's `astronaut()` (a dev tool of this repository).
- Portraits from ComfyUI's own workflow-template media packages, in the versions ComfyUI 0.3.75
  pins, installed by scripts/dev-setup apart from the host's (newer hosts pin versions without
  some of these photos). Two pairs show the same person twice: an inpainting example
  (before/after) and an editing example (before/after).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (package, file inside the package)
TEMPLATE_PHOTOS = {
    "freckles": ("comfyui_workflow_templates_media_image", "templates/flux_dev_checkpoint_example-1.webp"),
    "lilac": ("comfyui_workflow_templates_media_other", "templates/2_pass_pose_worship-1.webp"),
    "sparkle": ("comfyui_workflow_templates_media_other", "templates/sd3.5_simple_example-1.webp"),
    "veil": ("comfyui_workflow_templates_media_other", "templates/hidream_i1_dev-1.webp"),
    "harbour": ("comfyui_workflow_templates_media_other", "templates/image_z_image_turbo-1.webp"),
    "turtleneck": ("comfyui_workflow_templates_media_image", "templates/flux1_krea_dev-1.webp"),
    "wheat_before": ("comfyui_workflow_templates_media_image", "templates/flux_fill_inpaint_example-1.webp"),
    "wheat_after": ("comfyui_workflow_templates_media_image", "templates/flux_fill_inpaint_example-2.webp"),
    "flowers_before": ("comfyui_workflow_templates_media_other", "templates/hidream_e1_1-1.webp"),
    "flowers_after": ("comfyui_workflow_templates_media_other", "templates/hidream_e1_1-2.webp"),
    # a woman at a desk with a framed portrait behind her: two faces, one much smaller
    "desk_two_faces": ("comfyui_workflow_templates_media_other", "templates/embedding_example-1.webp"),
}
# One face each, all different people (the pairs above are represented once).
SINGLE_PORTRAITS = (
    "astronaut",
    "freckles",
    "lilac",
    "sparkle",
    "veil",
    "harbour",
    "turtleneck",
    "wheat_before",
)
SAME_PERSON_PAIRS = (("wheat_before", "wheat_after"), ("flowers_before", "flowers_after"))


def template_photo_path(name: str) -> Path:
    from .host import portrait_packages

    package, inner = TEMPLATE_PHOTOS[name]
    path = portrait_packages() / package / inner
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run scripts/dev-setup to install the pinned portraits again.")
    return path


@cache
def portrait(name: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    if name == "astronaut":
        from skimage import data

        return np.ascontiguousarray(data.astronaut())
    with Image.open(template_photo_path(name)) as image:
        return np.asarray(image.convert("RGB")).copy()


def canvas_with_portraits(height: int, width: int, placements: list[tuple[str, int, int, int]]) -> np.ndarray:
    """A grey canvas with whole portraits scaled into it, e.g. a small real face in a large
    photo. placements: (portrait name, left, top, side) each; [height, width, 3] uint8."""
    canvas = np.full((height, width, 3), 115, dtype=np.uint8)
    for name, left, top, side in placements:
        image = Image.fromarray(portrait(name)).resize((side, side), Image.Resampling.LANCZOS)
        canvas[top : top + side, left : left + side] = np.asarray(image)
    return canvas


def large_photo() -> np.ndarray:
    """1536x1536: the astronaut's whole portrait shrunk to 256 px, so her face is about 45 px."""
    return canvas_with_portraits(1536, 1536, [("astronaut", 640, 900, 256)])


def two_people_photo() -> np.ndarray:
    """320x192: the astronaut (left, face about 34 px) and the woman of the "veil" portrait
    (right, about 77 px), side by side. Small, so that sampling it is cheap."""
    return canvas_with_portraits(192, 320, [("astronaut", 0, 16, 160), ("veil", 160, 16, 160)])


def small_portrait(name: str, size: int = 256) -> np.ndarray:
    return np.asarray(Image.fromarray(portrait(name)).resize((size, size), Image.Resampling.LANCZOS))
