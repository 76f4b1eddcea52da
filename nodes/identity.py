"""Reference photos -> identity (FaceNet embeddings and identity tokens)."""

import comfy.model_management
import torch
from comfy_api.latest import io

from ..pva.facenet import embed_faces
from ..pva.faces import align_faces, detect_faces
from ..pva.identity import Identity
from .types import CATEGORY, FaceNetType, IdentityType, PVAModelType


def encode_references(pva, facenet, images, threshold: float, face_index: int) -> Identity:
    faces = detect_faces(images, threshold=threshold, face_index=None if face_index < 0 else face_index)
    crops = align_faces(images, faces)
    device = comfy.model_management.get_torch_device()
    facenet.to(device)
    try:
        embeddings = embed_faces(facenet, crops).cpu()
    finally:
        facenet.to(comfy.model_management.unet_offload_device())
    return Identity(
        tokens=pva.encode(embeddings),
        face_embeddings=embeddings,
        context_dim=pva.context_dim,
        pva_instance_id=pva.instance_id,
        family=pva.family,
    )


class PVAEncodeIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAEncodeIdentity",
            display_name="Encode Identity (PVA)",
            category=CATEGORY,
            description="Finds the face in each reference photo (MTCNN), aligns it, embeds it with FaceNet "
            "and turns the embeddings into identity tokens with the PVA model's identity encoder.",
            inputs=[
                PVAModelType.Input(
                    "pva_model", tooltip="The PVA model whose identity encoder makes the tokens."
                ),
                FaceNetType.Input("facenet", tooltip="From 'Load FaceNet (PVA)'."),
                io.Image.Input(
                    "reference_images",
                    tooltip="Photos of the person (a batch; about 5 works best). Any size; each needs a visible face.",
                ),
                io.Float.Input(
                    "detection_threshold",
                    default=0.9,
                    min=0.1,
                    max=0.999,
                    step=0.01,
                    tooltip="MTCNN's final-stage face probability threshold; lower it for hard photos.",
                ),
                io.Int.Input(
                    "face_index",
                    default=-1,
                    min=-1,
                    max=31,
                    tooltip="Which face to use when a photo has several: -1 = the largest, 0 = largest, 1 = second largest, ...",
                ),
            ],
            outputs=[IdentityType.Output(display_name="IDENTITY")],
        )

    @classmethod
    def execute(
        cls, pva_model, facenet, reference_images: torch.Tensor, detection_threshold: float, face_index: int
    ):
        return io.NodeOutput(
            encode_references(pva_model, facenet, reference_images, detection_threshold, face_index)
        )
