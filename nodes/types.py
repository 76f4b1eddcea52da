"""Socket types the pack passes between its nodes."""

from comfy_api.latest import io

PVAModelType = io.Custom("PVA_MODEL")  # pva.model.PVAModel
FaceNetType = io.Custom("FACENET")  # pva.facenet.FaceNet (InceptionResnetV1 + ModelPatcher)
IdentityType = io.Custom("PVA_IDENTITY")  # pva.identity.Identity (face embeddings)
FacesType = io.Custom("FACES")  # pva.faces.Faces (per photo: its size, boxes, landmarks, scores)

CATEGORY = "PVA face inpainting"
