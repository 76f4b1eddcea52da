"""A prompt with a person token, encoded from the PVA model that carries the token."""

from comfy_api.latest import io

from ..pva.host.text import encode, tokenize_with_token
from ..pva.training.person_prompt import check_token_prompt
from .types import CATEGORY, PVAModelType


class PVAEncodePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAEncodePrompt",
            display_name="Encode Prompt with Person (PVA)",
            category=CATEGORY,
            description="CLIPTextEncode for a prompt that names a person by their token, embedding:<name>, taken "
            "from the PVA model that learned it (Quick Personalize with a person token, or a saved person). "
            "Gives the same CONDITIONING as CLIPTextEncode once Save PVA Model has written the token to "
            "models/embeddings, and needs no file.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder the token was trained with."),
                PVAModelType.Input("pva_model", tooltip="A PVA model with a person token."),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The prompt; write embedding:<name> for the person.",
                ),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, clip, pva_model, text: str) -> io.NodeOutput:
        token = pva_model.person_token
        if token is None:  # a PVA model without a token: the prompt is encoded as written
            return io.NodeOutput(encode(clip, clip.tokenize(text)))
        check_token_prompt(clip, text, token, input_name="text")
        return io.NodeOutput(encode(clip, tokenize_with_token(clip, text, token.name, token.tensors())))
