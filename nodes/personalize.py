"""Quick personalization: learn a person from reference photos inside the graph."""

import comfy.utils
import torch
from comfy_api.latest import io
from tqdm import tqdm

from ..pva.host.text import class_word_vectors
from ..pva.method.model import TRAINABLE, PVAModel
from ..pva.method.person_token import PersonToken
from ..pva.training.data import prepare_personalization_data
from ..pva.training.person_prompt import TokenPrompt
from ..pva.training.personalize import TrainingSettings, personalize
from ..pva.training.recipe import RECIPES, resolve_recipe
from .loss_plot import loss_curve_image
from .types import CATEGORY, FaceNetType, PVAModelType, detection_threshold_input

LossMapType = io.Custom("LOSS_MAP")  # ComfyUI core's loss convention (its LossGraphNode reads it)


class PVAQuickPersonalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAQuickPersonalize",
            display_name="Quick Personalize (PVA)",
            category=CATEGORY,
            description="Learns one person from their reference photos in a few dozen steps (the paper uses "
            "40): each photo in turn is inpainted (whole-face mask) from the others' identity, and only the "
            "PVA parameters train. The MODEL, VAE and CLIP are not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model, ideally the inpainting model you will use."),
                io.Vae.Input("vae", tooltip="The VAE of that checkpoint."),
                io.Clip.Input("clip", tooltip="The text encoder of that checkpoint (for the prompt)."),
                FaceNetType.Input("facenet", tooltip="From 'Load FaceNet (PVA)'."),
                io.Image.Input("reference_images", tooltip="1 to N photos of the person (one photo: its mirror image serves as reference)."),
                io.String.Input("prompt", default="photo of a person", tooltip="Caption used for every training image."),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Optimizer steps (the paper: 40)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip="AdamW learning rate."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Reference photos per step (gradients accumulated)."),
                io.Int.Input("time_bins", default=4, min=1, max=64, tooltip="Each photo is used at one timestep from each of this many equal bins of the schedule."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Side of the square training crop around each face, in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Same seed and inputs give the same weights (on CPU bit-identical). Kept fixed so a finished training is reused from ComfyUI's cache."),
                io.Combo.Input("train", options=list(TRAINABLE), default="both", tooltip="Which PVA parameters train."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute activations in the backward pass: less memory, ~30% slower."),
                io.Combo.Input("mixed_precision", options=["auto", "none"], default="auto", tooltip="auto: bf16 autocast on a GPU that supports it; none: the model's own dtype."),
                detection_threshold_input(),
                io.Int.Input("face_index", default=0, min=0, max=63, tooltip="Which face of each photo when it shows several: 0 = the largest, 1 = the next largest, ..."),
                PVAModelType.Input("pva_model", optional=True, tooltip="Start from this PVA model (e.g. a pretrained one); otherwise one is initialized from the MODEL."),
                io.Combo.Input("recipe", options=list(RECIPES), default="auto", optional=True, tooltip="auto: 'PVA + person token' when the PVA model was never pretrained (then the person is learned as a new word too), otherwise 'PVA only'. The node's 'recipe' output says which ran."),
                io.String.Input("person_token", default="", optional=True, tooltip="Name of the person's new word (e.g. anna_pva), written in prompts as embedding:<name>; the prompt above must contain it. Save PVA Model also writes it to models/embeddings so any prompt can use it."),
                io.String.Input("class_word", default="person", optional=True, tooltip="One common word the person token starts from (person, woman, man)."),
                io.Float.Input("token_learning_rate", default=2e-2, min=1e-6, max=1.0, step=1e-4, optional=True, tooltip="AdamW learning rate of the person token."),
            ],
            outputs=[
                PVAModelType.Output(display_name="PVA_MODEL"),
                LossMapType.Output(display_name="loss"),
                io.Image.Output(display_name="loss_plot"),
                io.String.Output(display_name="recipe"),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, model, vae, clip, facenet, reference_images, prompt, steps, learning_rate, batch_size, time_bins,
        resolution, seed, train, gradient_checkpointing, mixed_precision, detection_threshold, face_index=0,
        pva_model=None, recipe="auto", person_token="", class_word="person", token_learning_rate=2e-2,
    ) -> io.NodeOutput:  # fmt: skip
        settings = TrainingSettings(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, time_bins=time_bins, seed=seed,
            train=train, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            token_learning_rate=token_learning_rate,
        )  # fmt: skip
        settings.validate()  # before the face detection and VAE encoding, not after
        pva = pva_model if pva_model is not None else PVAModel.initialize_from(model, seed=seed)
        with_token, recipe_said = resolve_recipe(recipe, pva, person_token)
        token_prompt = None
        if with_token:
            token_prompt = TokenPrompt(
                clip, prompt, start_token(pva, clip, person_token.strip(), class_word.strip())
            )
        with torch.inference_mode(False):
            data = prepare_personalization_data(
                reference_images, facenet, resolution, detection_threshold, face_index=face_index,
                minimum_photos=2 if with_token else 1,
            )  # fmt: skip
        positive = None if with_token else clip.encode_from_tokens_scheduled(clip.tokenize(prompt))

        progress = comfy.utils.ProgressBar(steps)
        console = tqdm(total=steps, desc="PVA personalization", disable=not comfy.utils.PROGRESS_BAR_ENABLED)

        def on_step(step: int, loss: float) -> None:
            progress.update_absolute(step + 1, steps)
            console.set_postfix(loss=f"{loss:.4f}")
            console.update(1)

        try:
            result = personalize(
                model, vae, positive, data, pva, settings, on_step=on_step, prompt=token_prompt
            )
        finally:
            console.close()
        return io.NodeOutput(
            result.pva, {"loss": result.losses}, loss_curve_image(result.losses), recipe_said,
            ui={"text": [recipe_said]},
        )  # fmt: skip


def start_token(pva: PVAModel, clip, name: str, class_word: str) -> PersonToken:  # noqa: ANN001
    """The token to train: the PVA model's own when it already has this person's (training on),
    else a new one started from the class word."""
    if pva.person_token is not None and pva.person_token.name == name:
        return pva.person_token
    return PersonToken(name, class_word_vectors(clip, class_word or "person", TOKEN_VECTORS), class_word)


TOKEN_VECTORS = 1  # vectors per person token (the research recipe's <new1> is one word)
