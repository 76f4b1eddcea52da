"""Quick-personalization data: each reference in turn is the target, the others its references."""

from dataclasses import dataclass

import torch

from ..errors import PVAError
from ..faces.crops import crop_face
from ..faces.detection import DetectionSettings, Faces, ImageBatch, image_list
from ..faces.embeddings import embed_photos
from ..faces.facenet import FaceNet
from ..faces.regions import region_mask

# A face enlarged more than this to fill the training crop is mostly interpolation: the model would
# learn blur as the person's look.
MAX_ENLARGEMENT = 4.0


@dataclass(frozen=True)
class PersonalizationData:
    pixels: torch.Tensor  # [N, R, R, 3] square crops around each face, 0..1 (ComfyUI IMAGE)
    masks: torch.Tensor  # [N, R, R] whole-face inpainting masks, 0/1
    embeddings: torch.Tensor  # [N, 512] FaceNet embeddings of the references
    flipped_embeddings: torch.Tensor  # [N, 512] of the mirrored faces (the one-photo rule)
    mirrored_targets: bool = False  # the second half of the targets mirrors the first

    @property
    def count(self) -> int:
        """Targets (each photo, and with mirrored targets each photo's mirror image)."""
        return self.pixels.shape[0]

    @property
    def photos(self) -> int:
        return self.count // 2 if self.mirrored_targets else self.count

    def references_for(self, target: int) -> torch.Tensor:
        """Embeddings the target is reconstructed from: every other photo (never the target's
        own photo, mirrored or not), or with a single photo its horizontal flip (the method's
        rule)."""
        if self.photos == 1:
            return self.flipped_embeddings[target : target + 1]
        photo = target % self.photos
        keep = [i for i in range(self.photos) if i != photo]
        return self.embeddings[keep]

    def with_mirrored_targets(self) -> "PersonalizationData":
        """Each photo's mirror image as a target too (flip augmentation; a face's identity does
        not change in a mirror, and FaceNet's embedding of the mirror is already known)."""
        if self.mirrored_targets:
            return self
        return PersonalizationData(
            torch.cat([self.pixels, self.pixels.flip(2)]),
            torch.cat([self.masks, self.masks.flip(2)]),
            torch.cat([self.embeddings, self.flipped_embeddings]),
            torch.cat([self.flipped_embeddings, self.embeddings]),
            mirrored_targets=True,
        )


def prepare_personalization_data(
    images: ImageBatch,
    facenet: FaceNet | torch.nn.Module,
    resolution: int = 512,
    threshold: float = 0.9,
    context: float = 2.0,
    face_index: int = 0,
    faces: Faces | None = None,
    minimum_photos: int = 1,
) -> PersonalizationData:
    """Detect, crop and embed the reference photos (the `face_index`-th face of each, in
    largest-first order); build each one's whole-face mask. `faces`: faces located earlier
    (e.g. the fixed crop of aligned photos, which MTCNN need not find) instead of detecting.
    `minimum_photos`: what the recipe needs (a person token learns one photo's background and
    expression as the person from a single photo)."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
        raise PVAError("reference_images: the batch is empty; connect at least one photo of the person.")
    photos = image_list(images)
    if len(photos) < minimum_photos:
        raise PVAError(
            f"reference_images: {len(photos)} photo{'s' if len(photos) != 1 else ''}; learning a person token needs at least {minimum_photos} "
            "different photos of the person (3 to 5 work best), or a pretrained PVA model with the 'PVA only' recipe."
        )
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
        enlargement = resolution / max(face.size * context, 1.0)
        if enlargement > MAX_ENLARGEMENT:
            raise PVAError(
                f"reference_images: the face in photo {i + 1} is {face.size:.0f} px; training at resolution "
                f"{resolution} would enlarge it {enlargement:.1f}x (more than {MAX_ENLARGEMENT:.0f}x is mostly blur). "
                f"Use photos with larger faces or lower resolution to {_fitting_resolution(face.size * context)}."
            )
        crop, in_crop = crop_face(photos[i], face, resolution, context)
        crops.append(crop.clamp(0, 1))
        masks.append(region_mask(in_crop, "whole face", resolution, resolution))
    return PersonalizationData(
        torch.stack(crops), torch.stack(masks).float(), embedded.embeddings, embedded.mirrored
    )


def _fitting_resolution(side: float) -> int:
    return max(64, int(side * MAX_ENLARGEMENT) // 64 * 64)
