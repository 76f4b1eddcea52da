"""Identity similarity of results to a person's references, with a recognizer of the user's choice."""

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ..pva.errors import PVAError
from ..pva.faces.detection import DetectionSettings
from ..pva.measure.recognition import FACE_MODES, FaceLocator, load_recognizer
from ..pva.measure.recognition.check import NO_FACE_SCORE, check_identity
from .folders import missing_model_message
from .types import CATEGORY, FaceNetType, IdentityType

BUILT_IN = ("dlib", "facenet")


def recognizer_options() -> list[str]:
    return [*BUILT_IN, *folder_paths.get_filename_list("face_recognition")]


class PVAIdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAIdentitySimilarity",
            display_name="Identity Similarity (PVA)",
            category=CATEGORY,
            description="How much each image still looks like the person in the reference photos: the cosine "
            "similarity of face-recognition features (the paper's ID similarity), with the face box and score "
            "drawn on the image. Use a recognizer PVA was not conditioned on (dlib or an ArcFace/CosFace ONNX "
            "model) for an independent judgement.",
            inputs=[
                io.Image.Input("images", tooltip="The results to check (e.g. the inpainted photo)."),
                io.Combo.Input(
                    "recognizer",
                    options=recognizer_options(),
                    default="dlib",
                    tooltip="dlib: dlib's ResNet, independent of PVA (optional package: pip install --no-deps "
                    "dlib-bin face-recognition-models). facenet: the network PVA reads, so not independent; needs "
                    "a FACENET. Or an ArcFace/CosFace .onnx from ComfyUI/models/face_recognition/ (e.g. "
                    "insightface's glintr100.onnx, close to the paper's CosFace R100; needs onnxruntime).",
                ),
                io.Image.Input(
                    "reference_images",
                    optional=True,
                    tooltip="Photos of the person to compare with (one face each).",
                ),
                IdentityType.Input(
                    "identity",
                    optional=True,
                    tooltip="Instead of reference photos: an IDENTITY from 'Encode Identity (PVA)' (its faces are "
                    "FaceNet embeddings, so only with the facenet recognizer).",
                ),
                FaceNetType.Input(
                    "facenet",
                    optional=True,
                    tooltip="From 'Load FaceNet (PVA)'; needed by the facenet recognizer.",
                ),
                io.Combo.Input(
                    "faces",
                    options=list(FACE_MODES),
                    default="detect",
                    tooltip="detect: find the face with MTCNN. aligned: the images are aligned face crops "
                    "(CelebA-HQ style); the face is taken at a fixed place without a detector, as the paper's "
                    "evaluation does.",
                ),
                io.Float.Input(
                    "detection_threshold",
                    default=0.9,
                    min=0.1,
                    max=0.999,
                    step=0.01,
                    tooltip="MTCNN's face probability threshold (detect mode).",
                ),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    tooltip="Which face of each image when it shows several: 0 = the largest, 1 = the next, ...",
                ),
            ],
            outputs=[
                io.Float.Output(
                    display_name="similarity",
                    is_output_list=True,
                    tooltip=f"One value per image: mean cosine similarity to the references ({NO_FACE_SCORE:g} "
                    "where no face was found).",
                ),
                io.Image.Output(display_name="annotated", tooltip="The images with the face box and score."),
                io.String.Output(
                    display_name="summary", tooltip="One line per image, and the recognizer's verdict."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, recognizer: str) -> bool | str:
        # Naming the input here replaces ComfyUI's queue-time "Value not in list" with ours.
        if recognizer in BUILT_IN:
            return True
        return missing_model_message("face_recognition", recognizer, "recognizer") or True

    @classmethod
    def execute(
        cls, images, recognizer, reference_images=None, identity=None, facenet=None, faces="detect",
        detection_threshold=0.9, face_index=0,
    ) -> io.NodeOutput:  # fmt: skip
        if reference_images is None and identity is None:
            raise PVAError("Identity Similarity: connect reference_images (or an IDENTITY) to compare with.")
        if reference_images is None and recognizer != "facenet":
            raise PVAError(
                f"Identity Similarity: an IDENTITY holds FaceNet embeddings, which {recognizer} cannot compare "
                "with; connect reference_images, or choose the facenet recognizer."
            )
        if recognizer in BUILT_IN:
            name = recognizer
        else:
            message = missing_model_message("face_recognition", recognizer, "recognizer")
            if message:
                raise PVAError(message)
            name = f"onnx:{folder_paths.get_full_path('face_recognition', recognizer)}"
        device = comfy.model_management.get_torch_device().type
        locator = FaceLocator(faces, DetectionSettings(threshold=detection_threshold), face_index)
        check = check_identity(
            images,
            load_recognizer(name, facenet=facenet, device=device),
            locator,
            reference_images=reference_images,
            reference_embeddings=identity.face_embeddings if reference_images is None else None,
        )
        preview = ui.PreviewImage(check.annotated, cls=cls).as_dict()
        # the summary and the values also reach /history (API users read them there)
        preview["text"] = (check.summary,)
        preview["similarity"] = check.values
        return io.NodeOutput(check.values, check.annotated, check.summary, ui=preview)
