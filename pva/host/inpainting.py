"""The ComfyUI calls the evaluation makes, in one place: loading a checkpoint, encoding text and
inpainting with the host's own nodes (InpaintModelConditioning, the KSampler's common_ksampler,
the VAE), as a workflow would."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import PVAError

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP, VAE

TextEncoder = Callable[[str], list]  # prompt -> CONDITIONING


def clip_text_encoder(clip: CLIP) -> TextEncoder:
    """What CLIPTextEncode does."""
    return lambda prompt: clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def inpaint(
    model: ModelPatcher,
    vae: VAE,
    positive: list,
    negative: list,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
    steps: int,
    cfg: float,
    sampler: str,
    scheduler: str,
    paste_back: bool = True,
) -> torch.Tensor:
    """[H, W, 3] inpainting of one [H, W, 3] photo in its [H, W] mask (1 = repaint)."""
    import comfy.utils

    import nodes  # ComfyUI's core nodes module (the host's, not this pack's nodes/)

    if pixels.shape[:2] != mask.shape:
        raise PVAError(
            f"inpaint: photo {tuple(pixels.shape[:2])} and mask {tuple(mask.shape)} differ in size."
        )
    with torch.inference_mode():
        positive, negative, latent = nodes.InpaintModelConditioning().encode(
            positive, negative, pixels[None], vae, mask[None], noise_mask=True
        )
        enabled, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
        try:
            (samples,) = nodes.common_ksampler(
                model, seed, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=1.0
            )
        finally:
            comfy.utils.PROGRESS_BAR_ENABLED = enabled
        result = vae.decode(samples["samples"])[0].float().cpu()
    height, width = result.shape[:2]
    photo = pixels[:height, :width]
    if paste_back:
        keep = mask[:height, :width, None]
        result = keep * result + (1 - keep) * photo
    return result.clamp(0, 1)
