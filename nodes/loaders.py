"""Load FaceNet and PVA models, or initialize a PVA model from the loaded MODEL."""

import os

import folder_paths
from comfy_api.latest import io

from ..pva.errors import PVAError
from ..pva.faces.facenet import load_facenet
from ..pva.method.model import PVAModel
from ..pva.method.weights import load_pva
from .folders import missing_model_message
from .types import CATEGORY, FaceNetType, PVAModelType


def _full_path(folder: str, name: str, what: str) -> str:
    message = missing_model_message(folder, name, what)
    if message:
        raise PVAError(message)
    return folder_paths.get_full_path(folder, name)


def _file_fingerprint(folder: str, name: str) -> tuple:
    """Changes when the file does (e.g. Save PVA Model overwrote it), so ComfyUI reloads it
    instead of answering from its cache."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return (name, None)
    stat = os.stat(path)
    return (name, stat.st_mtime_ns, stat.st_size)


class PVAFaceNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAFaceNetLoader",
            display_name="Load FaceNet (PVA)",
            category=CATEGORY,
            description="Loads the FaceNet face-recognition network (InceptionResnetV1, VGGFace2) that turns "
            "each reference face into a 512-d identity embedding. Put 20180402-114759-vggface2.pt "
            "(or a .safetensors conversion) in ComfyUI/models/facenet/.",
            inputs=[
                io.Combo.Input(
                    "facenet_name",
                    options=folder_paths.get_filename_list("facenet"),
                    tooltip="A FaceNet VGGFace2 weights file from ComfyUI/models/facenet/.",
                ),
            ],
            outputs=[FaceNetType.Output(display_name="FACENET")],
        )

    @classmethod
    def validate_inputs(cls, facenet_name: str) -> bool | str:
        # Naming the input here replaces ComfyUI's queue-time "Value not in list" with ours.
        return missing_model_message("facenet", facenet_name, "facenet_name") or True

    @classmethod
    def fingerprint_inputs(cls, facenet_name: str) -> tuple:
        return _file_fingerprint("facenet", facenet_name)

    @classmethod
    def execute(cls, facenet_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_facenet(_full_path("facenet", facenet_name, "facenet_name")))


class PVAModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAModelLoader",
            display_name="Load PVA Model",
            category=CATEGORY,
            description="Loads a PVA model (identity encoder + parallel attention projections) from "
            "ComfyUI/models/pva/. A file is made for one model family (SD1.x, SD2.x or SDXL).",
            inputs=[
                io.Combo.Input(
                    "pva_name",
                    options=folder_paths.get_filename_list("pva"),
                    tooltip="A .safetensors file written by 'Save PVA Model' (or shared by someone who trained one).",
                ),
            ],
            outputs=[PVAModelType.Output(display_name="PVA_MODEL")],
        )

    @classmethod
    def validate_inputs(cls, pva_name: str) -> bool | str:
        return missing_model_message("pva", pva_name, "pva_name") or True

    @classmethod
    def fingerprint_inputs(cls, pva_name: str) -> tuple:
        return _file_fingerprint("pva", pva_name)

    @classmethod
    def execute(cls, pva_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_pva(_full_path("pva", pva_name, "pva_name")))


class PVAInitializeFromModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAInitializeFromModel",
            display_name="Initialize PVA Model from MODEL",
            category=CATEGORY,
            description="Creates an untrained PVA model that fits the loaded MODEL: each layer's W'q/W'k/W'v "
            "are copies of its Wq/Wk/Wv (Flux: the image query and text key/value weights of each "
            "double-stream block) and the identity encoder is freshly seeded. A starting point for "
            "quick personalization; on its own it does not yet preserve identity.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the PVA model is made for."),
                io.Int.Input(
                    "num_tokens", default=10, min=1, max=77, tooltip="Identity tokens M (the paper uses 10)."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed for the identity encoder's initial weights.",
                ),
            ],
            outputs=[PVAModelType.Output(display_name="PVA_MODEL")],
        )

    @classmethod
    def execute(cls, model, num_tokens: int, seed: int) -> io.NodeOutput:
        return io.NodeOutput(PVAModel.initialize_from(model, num_tokens=num_tokens, seed=seed))
