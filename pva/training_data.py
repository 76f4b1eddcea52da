"""Quick-personalization data: each reference in turn is the target, the others its references."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PVAError
from .face_embeddings import embed_photos
from .facenet import FaceNet
from .faces import DetectedFace, DetectionSettings, Faces, ImageBatch, image_list
from .regions import region_mask


@dataclass(frozen=True)
class PersonalizationData:
    pixels: torch.Tensor  # [N, R, R, 3] square crops around each face, 0..1 (ComfyUI IMAGE)
    masks: torch.Tensor  # [N, R, R] whole-face inpainting masks, 0/1
    embeddings: torch.Tensor  # [N, 512] FaceNet embeddings of the references
    flipped_embeddings: torch.Tensor  # [N, 512] of the mirrored faces (the one-photo rule)

    @property
    def count(self) -> int:
        return self.pixels.shape[0]

    def references_for(self, target: int) -> torch.Tensor:
        """Embeddings the target is reconstructed from: every other photo, or with a single
        photo its horizontal flip (the method's rule)."""
        if self.count == 1:
            return self.flipped_embeddings
        keep = [i for i in range(self.count) if i != target]
        return self.embeddings[keep]


def square_crop(
    image: torch.Tensor, face: DetectedFace, resolution: int, context: float
) -> tuple[torch.Tensor, DetectedFace]:
    """A square of side `context` x the face size around the face, resampled to resolution.

    Returns the crop [R, R, 3] and the face in crop coordinates."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = face.box
    side = max(x2 - x1, y2 - y1) * context
    side = min(side, max(height, width))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x0, y0 = cx - side / 2, cy - side / 2
    # grid_sample coordinates in [-1, 1] of the photo (align_corners=False)
    steps = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * side
    gx = (x0 + steps) / width * 2 - 1
    gy = (y0 + steps) / height * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    photo = image.permute(2, 0, 1).unsqueeze(0).float()
    crop = F.grid_sample(photo, grid, mode="bilinear", padding_mode="border", align_corners=False)
    scale = resolution / side
    in_crop = face.mapped(lambda x, y: ((x - x0) * scale, (y - y0) * scale))
    return crop[0].permute(1, 2, 0).clamp(0, 1), in_crop


def prepare_personalization_data(
    images: ImageBatch,
    facenet: FaceNet | torch.nn.Module,
    resolution: int = 512,
    threshold: float = 0.9,
    context: float = 2.0,
    face_index: int = 0,
    faces: Faces | None = None,
) -> PersonalizationData:
    """Detect, crop and embed the reference photos (the `face_index`-th face of each, in
    largest-first order); build each one's whole-face mask. `faces`: faces located earlier
    (e.g. the fixed crop of aligned photos, which MTCNN need not find) instead of detecting."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
        raise PVAError("reference_images: the batch is empty; connect at least one photo of the person.")
    photos = image_list(images)
    embedded = embed_photos(
        photos,
        facenet,
        faces=faces,
        detection=DetectionSettings(threshold=threshold),
        selection=(face_index,),
        mirrored=True,
    )
    crops, masks = [], []
    for i, face in embedded.faces.pairs():
        crop, in_crop = square_crop(photos[i], face, resolution, context)
        crops.append(crop)
        masks.append(region_mask(in_crop, "whole face", resolution, resolution))
    return PersonalizationData(
        torch.stack(crops), torch.stack(masks).float(), embedded.embeddings, embedded.mirrored
    )
