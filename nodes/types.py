"""Socket types the pack passes between its nodes."""

from comfy_api.latest import io

PVAModelType = io.Custom("PVA_MODEL")  # pva.method.model.PVAModel
FaceNetType = io.Custom("FACENET")  # pva.facenet.FaceNet (InceptionResnetV1 + ModelPatcher)
IdentityType = io.Custom("PVA_IDENTITY")  # pva.identity.Identity (face embeddings)
FacesType = io.Custom("FACES")  # pva.faces.detection.Faces (per photo: its size, boxes, landmarks, scores)
FaceCropsType = io.Custom("PVA_FACE_CROPS")  # pva.face_crops.FaceCrops (where each crop came from)

CATEGORY = "PVA face inpainting"


def detection_threshold_input() -> io.Float.Input:
    """The MTCNN threshold widget every face-finding node shows."""
    return io.Float.Input(
        "detection_threshold",
        default=0.9,
        min=0.1,
        max=0.999,
        step=0.01,
        tooltip="MTCNN's final-stage face probability threshold; lower it for hard photos.",
    )
