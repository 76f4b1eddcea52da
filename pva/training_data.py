"""Quick-personalization data: each reference in turn is the target, the others its references."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PVAError
from .facenet import embed_faces
from .faces import DetectedFace, ImageBatch, align_faces, detect_faces, face_region_mask, image_list


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


def _square_crop(
    image: torch.Tensor, face: DetectedFace, resolution: int, context: float
) -> tuple[torch.Tensor, tuple]:
    """A square of side `context` x the face size around the face, resampled to resolution.

    Returns the crop [R, R, 3] and the affine map (scale, x0, y0) from photo to crop pixels."""
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
    return crop[0].permute(1, 2, 0).clamp(0, 1), (resolution / side, x0, y0)


def _in_crop(face: DetectedFace, transform: tuple) -> DetectedFace:
    scale, x0, y0 = transform
    x1, y1, x2, y2 = face.box
    box = ((x1 - x0) * scale, (y1 - y0) * scale, (x2 - x0) * scale, (y2 - y0) * scale)
    landmarks = tuple(((x - x0) * scale, (y - y0) * scale) for x, y in face.landmarks)
    return DetectedFace(box=box, landmarks=landmarks, probability=face.probability)


def prepare_personalization_data(
    images: ImageBatch,
    facenet: torch.nn.Module,
    resolution: int = 512,
    threshold: float = 0.9,
    context: float = 2.0,
) -> PersonalizationData:
    """Detect, crop and embed the reference photos; build each one's whole-face mask."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
        raise PVAError("reference_images: the batch is empty; connect at least one photo of the person.")
    photos = image_list(images)
    faces = detect_faces(images, threshold=threshold)
    crops, masks = [], []
    for photo, face in zip(photos, faces, strict=True):
        crop, transform = _square_crop(photo, face, resolution, context)
        crops.append(crop)
        masks.append(face_region_mask(_in_crop(face, transform), resolution, resolution))
    aligned = align_faces(images, faces)
    device = next(facenet.parameters()).device
    embeddings = embed_faces(facenet, aligned.to(device)).cpu()
    flipped = embed_faces(facenet, aligned.flip(-1).to(device)).cpu()
    return PersonalizationData(torch.stack(crops), torch.stack(masks).float(), embeddings, flipped)
