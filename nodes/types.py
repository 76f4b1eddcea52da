"""Socket types the pack passes between its nodes."""

from comfy_api.latest import io

PVAModelType = io.Custom("PVA_MODEL")  # pva.model.PVAModel
FaceNetType = io.Custom("FACENET")  # facenet_pytorch.InceptionResnetV1
IdentityType = io.Custom("PVA_IDENTITY")  # pva.identity.Identity

CATEGORY = "PVA face inpainting"
