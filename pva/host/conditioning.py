"""Inpainting conditioning and the model call, as ComfyUI's sampler makes them: the training loss
runs the MODEL through exactly this path, so attention patches and wrappers act as in sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from comfy.model_base import BaseModel
    from comfy.sd import VAE


def inpaint_conditioning(
    positive: list, negative: list, pixels: torch.Tensor, vae: VAE, mask: torch.Tensor
) -> tuple[list, list, dict]:
    """ComfyUI's InpaintModelConditioning (noise_mask on): (positive, negative, LATENT)."""
    import nodes  # ComfyUI's core nodes module (the host's, not this pack's nodes/)

    return nodes.InpaintModelConditioning().encode(positive, negative, pixels, vae, mask, noise_mask=True)


def masked_for_inpainting(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] pixels as InpaintModelConditioning encodes them for the model's masked-image
    input: grey (0.5) where the rounded mask [B, H, W] is 1 (pixels and mask of one size)."""
    keep = (1.0 - mask.round())[..., None]
    return (pixels - 0.5) * keep + 0.5


def inpaint_conditioning_of_latents(positive: list, masked_latent: torch.Tensor, mask: torch.Tensor) -> list:
    """InpaintModelConditioning's positive from latents encoded beforehand (masked_latent: the
    VAE's latent of masked_for_inpainting(pixels, mask); mask [B, H, W] at the pixels' size)."""
    import node_helpers

    concat_mask = mask.reshape(-1, 1, *mask.shape[-2:])
    return node_helpers.conditioning_set_values(
        positive, {"concat_latent_image": masked_latent, "concat_mask": concat_mask}
    )


def model_conds(model: BaseModel, cond: list, latent: torch.Tensor, batch: int, device: torch.device) -> list:
    """The sampler's processing of a positive CONDITIONING (inpaint concat, area, ...) for `batch`
    noisy latents of `latent`'s (model-space) shape."""
    import comfy.sampler_helpers
    import comfy.samplers

    noise = torch.zeros((batch,) + tuple(latent.shape[1:]), device=device)
    processed = comfy.samplers.process_conds(
        model,
        noise,
        {"positive": comfy.sampler_helpers.convert_cond(cond)},
        device,
        latent_image=latent,
        denoise_mask=None,
        seed=0,
    )
    return processed["positive"]


def denoised(
    model: BaseModel, conds: list, x: torch.Tensor, sigmas: torch.Tensor, model_options: dict
) -> torch.Tensor:
    """The MODEL's denoised prediction of x at `sigmas`, through the sampler's cond batching."""
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(model, [conds], x, sigmas, model_options)[0]
