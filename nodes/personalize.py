"""Quick personalization: learn a person from reference photos inside the graph."""

import comfy.utils
import torch
from comfy_api.latest import io
from tqdm import tqdm

from ..pva.method.model import PVAModel
from ..pva.training.data import prepare_personalization_data
from ..pva.training.personalize import TRAINABLE, TrainingSettings, personalize
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
            ],
            outputs=[
                PVAModelType.Output(display_name="PVA_MODEL"),
                LossMapType.Output(display_name="loss"),
                io.Image.Output(display_name="loss_plot"),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, model, vae, clip, facenet, reference_images, prompt, steps, learning_rate, batch_size, time_bins,
        resolution, seed, train, gradient_checkpointing, mixed_precision, detection_threshold, face_index=0,
        pva_model=None,
    ) -> io.NodeOutput:  # fmt: skip
        settings = TrainingSettings(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, time_bins=time_bins, seed=seed,
            train=train, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
        )  # fmt: skip
        settings.validate()  # before the face detection and VAE encoding, not after
        pva = pva_model if pva_model is not None else PVAModel.initialize_from(model, seed=seed)
        with torch.inference_mode(False):
            data = prepare_personalization_data(
                reference_images, facenet, resolution, detection_threshold, face_index=face_index
            )
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))

        progress = comfy.utils.ProgressBar(steps)
        console = tqdm(total=steps, desc="PVA personalization", disable=not comfy.utils.PROGRESS_BAR_ENABLED)

        def on_step(step: int, loss: float) -> None:
            progress.update_absolute(step + 1, steps)
            console.set_postfix(loss=f"{loss:.4f}")
            console.update(1)

        try:
            result = personalize(model, vae, positive, data, pva, settings, on_step=on_step)
        finally:
            console.close()
        return io.NodeOutput(result.pva, {"loss": result.losses}, loss_curve_image(result.losses))
