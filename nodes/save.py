"""Save a PVA model to ComfyUI/models/pva/<name>.safetensors."""

import os
import re

import folder_paths
from comfy_api.latest import io

from ..pva.errors import PVAError
from ..pva.method.weights import check_embedding_free, save_embedding, save_pva
from .types import CATEGORY, PVAModelType

NAME_PATTERN = re.compile(r"^[\w][\w .()+-]*$")


def pva_file_path(name: str) -> str:
    """Where a PVA model named `name` is saved: the first models/pva folder."""
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not NAME_PATTERN.match(name) or ".." in name:
        raise PVAError(
            f"name: {name!r} is not a usable file name; use letters, digits, spaces and - _ . ( ) + (no folders)."
        )
    folder = folder_paths.get_folder_paths("pva")[0]
    return os.path.join(folder, name + ".safetensors")


class PVASaveModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVASaveModel",
            display_name="Save PVA Model",
            category=CATEGORY,
            description="Writes the PVA model to ComfyUI/models/pva/<name>.safetensors (atomically; an existing "
            "file is only replaced when overwrite is on). It shows up in 'Load PVA Model' without a restart. A "
            "person token it carries is also written to models/embeddings/<token>.safetensors, so that "
            "embedding:<token> works in any prompt.",
            inputs=[
                PVAModelType.Input("pva_model", tooltip="A personalized (or initialized) PVA model."),
                io.String.Input(
                    "name", default="person", tooltip="File name without extension, e.g. the person's name."
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of the same name."
                ),
            ],
            outputs=[io.String.Output(display_name="filename")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, pva_model, name: str, overwrite: bool) -> io.NodeOutput:
        path = pva_file_path(name)
        token = pva_model.person_token
        embeddings = folder_paths.get_folder_paths("embeddings")
        if token is not None:  # refuse before writing anything
            check_embedding_free(token, embeddings, overwrite)
        saved = [save_pva(pva_model, path, overwrite=overwrite).name]
        if token is not None:
            saved.append(f"embeddings/{save_embedding(token, embeddings, overwrite=overwrite).name}")
        return io.NodeOutput(saved[0], ui={"text": [f"saved {', '.join(saved)}"]})
