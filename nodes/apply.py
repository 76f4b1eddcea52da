"""Apply an identity to a MODEL through parallel visual attention."""

from comfy_api.latest import io

from ..pva.method.patching import SCOPES, apply_identity
from .types import CATEGORY, IdentityType, PVAModelType


class PVAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAApply",
            display_name="Apply PVA Identity",
            category=CATEGORY,
            description="Adds parallel visual attention to the MODEL: in every cross-attention layer (SD1.x, "
            "SD2.x, SDXL) or double-stream block (Flux, Flux Fill/Kontext, Flux.2) the image attends to the "
            "text and the identity tokens in one joint softmax. Returns a patched copy; the input MODEL is "
            "unchanged. Chain two Apply nodes with two masks for two people.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The diffusion model (an inpainting model for face inpainting)."
                ),
                PVAModelType.Input("pva_model", tooltip="Must be made for this MODEL's family."),
                IdentityType.Input("identity", tooltip="From 'Encode Identity (PVA)'."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=5.0,
                    step=0.05,
                    tooltip="Multiplies the identity tokens' share of attention (a log-bias on their scores). "
                    "0 = exactly the base model, 1 = the method as trained.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the denoising schedule at which the identity starts acting.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the denoising schedule at which the identity stops acting.",
                ),
                io.Combo.Input(
                    "apply_to",
                    options=list(SCOPES),
                    default="positive",
                    tooltip="positive: only the positive (cond) branch of CFG sees the identity, so CFG "
                    "pushes towards it; negative: only the negative (uncond) branch, so CFG pushes away from "
                    "it (face swap: the target's own identity; no effect at cfg 1); both: cond and uncond.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional region (image-sized MASK) where the identity acts; elsewhere the model "
                    "is the base model. Two Apply nodes with two masks put two people in one picture.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(
        cls, model, pva_model, identity, strength, start_percent, end_percent, apply_to, mask=None
    ) -> io.NodeOutput:
        patched = apply_identity(
            model,
            pva_model,
            identity.tokens_for(pva_model),
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            scope=apply_to,
            region=mask,
        )
        return io.NodeOutput(patched)
