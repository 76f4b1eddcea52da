"""Reference photos -> IDENTITY (the FaceNet embeddings of one person's faces)."""

import torch
from comfy_api.latest import io

from ..pva.faces.detection import DetectionSettings
from ..pva.faces.embeddings import embed_photos
from ..pva.method.identity import Identity
from .types import CATEGORY, FaceNetType, FacesType, IdentityType, detection_threshold_input


class PVAEncodeIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAEncodeIdentity",
            display_name="Encode Identity (PVA)",
            category=CATEGORY,
            description="Finds the face in each reference photo (MTCNN), aligns it and embeds it with FaceNet. "
            "The IDENTITY holds these embeddings; the PVA model that applies it turns them into identity "
            "tokens, so one IDENTITY works with any PVA model.",
            inputs=[
                FaceNetType.Input("facenet", tooltip="From 'Load FaceNet (PVA)'."),
                io.Image.Input(
                    "reference_images",
                    tooltip="Photos of the person (a batch; about 5 works best). Any size; each needs a visible face.",
                ),
                detection_threshold_input(),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    tooltip="Which face of each photo when it shows several: 0 = the first in the order "
                    "(largest first, or the order chosen in 'Detect Faces (PVA)'), 1 = the next, ...",
                ),
                FacesType.Input(
                    "faces",
                    optional=True,
                    tooltip="Faces already found in these photos by 'Detect Faces (PVA)' (its order and "
                    "settings apply); without it the faces are detected here, largest first.",
                ),
            ],
            outputs=[IdentityType.Output(display_name="IDENTITY")],
        )

    @classmethod
    def execute(
        cls, facenet, reference_images: torch.Tensor, detection_threshold: float, face_index: int, faces=None
    ) -> io.NodeOutput:
        embedded = embed_photos(
            reference_images,
            facenet,
            faces=faces,
            detection=DetectionSettings(threshold=detection_threshold),
            selection=(face_index,),
        )
        count = embedded.count
        return io.NodeOutput(
            Identity(embedded.embeddings, source=f"{count} reference photo{'s' if count != 1 else ''}")
        )
