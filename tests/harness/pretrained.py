"""A tiny SD1.5-inpainting UNet that has learned to inpaint synthetic people, cached on disk.

Why the identity-specificity test needs it: a noise-predicting UNet can only use what the
identity tokens say about the hidden face if it already passes the noisy latent through
(the best noise estimate is (x_t - sqrt(a) x0) / sqrt(1 - a)). A random UNet cannot, so with
random weights every gain from personalization is generic (it merely shrinks the random
output) and is the same for any person. After this short pretraining the base inpaints the
background well but cannot know the colour of a masked face (the people it saw have random
face colours), which is exactly what a person's identity adds.

The pretraining runs the real ComfyUI model (`BaseModel.apply_model`) with the inpainting
input built by ComfyUI's own InpaintModelConditioning and `process_conds`. It takes about two
minutes on 2 CPU cores; the result is cached under $PVA_DEV_HOME/test-models with a key that
covers the starting weights, the VAE and the recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import comfy.sampler_helpers
import comfy.samplers
import torch
from safetensors.torch import load_file, save_file

from pva.training import encode_inpaint_targets

from .checkpoints import cached_file, default_cache_dir
from .models import tiny_model
from .people import synthetic_person

RECIPE = dict(steps=1500, batch=16, learning_rate=1e-3, people=24, seed=123)


def pretrained_inpainting_model(vae, positive: list):  # noqa: ANN201
    """tiny_model("sd15", in_channels=9) after RECIPE's denoising pretraining (cached)."""
    model = tiny_model("sd15", in_channels=9)
    unet = model.model.diffusion_model

    def build(temporary: Path) -> None:
        _pretrain(model, vae, positive)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(temporary))

    path = default_cache_dir() / f"tiny-sd15-inpaint-people-{_cache_key(unet, vae)}.safetensors"
    unet.load_state_dict(load_file(cached_file(path, build)))
    return model


def _cache_key(unet: torch.nn.Module, vae) -> str:  # noqa: ANN001
    digest = hashlib.sha256(repr(sorted(RECIPE.items())).encode())
    for module in (unet, vae.first_stage_model):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _inpainting_examples(model, vae, positive: list) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Clean latents and their inpainting inputs (mask + masked-image latent), one per photo."""
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    base_model = model.model
    latents, concats = [], []
    for k in range(RECIPE["people"]):
        hue = tuple(torch.rand(3, generator=generator).tolist())
        person = synthetic_person(hue, seed=1000 + k)
        for cond, latent in encode_inpaint_targets(person, vae, positive):
            latent = base_model.process_latent_in(latent)
            latents.append(latent)
            concats.append(inpainting_input(base_model, cond, latent))
    return torch.cat(latents), torch.cat(concats)


def inpainting_input(base_model, cond: list, latent: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The UNet's extra input channels (mask + masked-image latent) ComfyUI's sampler makes from an
    InpaintModelConditioning `cond` for the clean `latent` (model space)."""
    processed = comfy.samplers.process_conds(
        base_model,
        torch.zeros_like(latent),
        {"positive": comfy.sampler_helpers.convert_cond(cond)},
        torch.device("cpu"),
        latent_image=latent,
        denoise_mask=None,
        seed=0,
    )["positive"][0]
    return processed["model_conds"]["c_concat"].cond


def _pretrain(model, vae, positive: list) -> None:  # noqa: ANN001
    latents, concats = _inpainting_examples(model, vae, positive)
    base_model, batch = model.model, RECIPE["batch"]
    sampling = base_model.model_sampling
    context = positive[0][0].expand(batch, -1, -1)
    parameters = list(base_model.diffusion_model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=RECIPE["learning_rate"])
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.inference_mode(False), torch.enable_grad():
        for parameter in parameters:
            parameter.requires_grad_(True)
        for _ in range(RECIPE["steps"]):
            pick = torch.randint(len(latents), (batch,), generator=generator)
            x0 = latents[pick]
            sigmas = sampling.sigma(torch.rand(batch, generator=generator) * 999)
            x_t = sampling.noise_scaling(sigmas, torch.randn(x0.shape, generator=generator), x0)
            denoised = base_model.apply_model(x_t, sigmas, c_concat=concats[pick], c_crossattn=context)
            loss = ((denoised - x0) / sigmas.view(-1, 1, 1, 1)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for parameter in parameters:
            parameter.requires_grad_(False)
