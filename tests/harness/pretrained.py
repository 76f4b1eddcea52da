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
minutes on one core; the result is a cached test model of harness.artefacts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pva.host.conditioning import model_conds
from pva.training.personalize import encode_inpaint_targets

from .artefacts import artefact, ensure, world_seed
from .models import text_conditioning, tiny_model, tiny_vae
from .people import synthetic_person

RECIPE = dict(steps=1500, batch=16, learning_rate=1e-3, people=24, seed=world_seed(123), version=2)


def _starting_model():  # noqa: ANN202
    """The tiny UNet, VAE and text conditioning the recipe starts from (and the tests use)."""
    model = tiny_model("sd15", in_channels=9, seed=world_seed(0))
    return model, tiny_vae(seed=world_seed(0)), text_conditioning(model, seed=world_seed(7))


@artefact("people-base", RECIPE, slow=True)
def _build(path: Path) -> None:
    """The tiny SD1.5-inpainting UNet taught to inpaint 24 coloured synthetic people."""
    model, vae, positive = _starting_model()
    _pretrain(model, vae, positive)
    save_file({k: v.contiguous() for k, v in model.model.diffusion_model.state_dict().items()}, str(path))


def pretrained_inpainting_model():  # noqa: ANN201
    """tiny_model("sd15", in_channels=9) after RECIPE's denoising pretraining (cached), with the
    tiny VAE and text conditioning it was trained with: (model, vae, positive)."""
    model, vae, positive = _starting_model()
    model.model.diffusion_model.load_state_dict(load_file(str(ensure("people-base"))))
    return model, vae, positive


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
    (processed, *_) = model_conds(base_model, cond, latent, latent.shape[0], torch.device("cpu"))
    return processed["model_conds"]["c_concat"].cond


def train_denoiser(base_model, latents, concats, context_for, recipe: dict) -> None:  # noqa: ANN001
    """Teach a UNet to inpaint: AdamW on every weight, the denoising loss on random picks of the
    clean `latents` with their inpainting inputs `concats` and text `context_for(pick)`, noise
    levels drawn uniformly over the schedule (recipe: steps, batch, learning_rate, seed)."""
    batch, sampling = recipe["batch"], base_model.model_sampling
    parameters = list(base_model.diffusion_model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe["learning_rate"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    with torch.inference_mode(False), torch.enable_grad():
        for parameter in parameters:
            parameter.requires_grad_(True)
        for _ in range(recipe["steps"]):
            pick = torch.randint(len(latents), (batch,), generator=generator)
            x0 = latents[pick]
            sigmas = sampling.sigma(torch.rand(batch, generator=generator) * 999)
            x_t = sampling.noise_scaling(sigmas, torch.randn(x0.shape, generator=generator), x0)
            denoised = base_model.apply_model(
                x_t, sigmas, c_concat=concats[pick], c_crossattn=context_for(pick)
            )
            loss = ((denoised - x0) / sigmas.view(-1, 1, 1, 1)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for parameter in parameters:
            parameter.requires_grad_(False)


def _pretrain(model, vae, positive: list) -> None:  # noqa: ANN001
    latents, concats = _inpainting_examples(model, vae, positive)
    context = positive[0][0]
    train_denoiser(model.model, latents, concats, lambda pick: context.expand(len(pick), -1, -1), RECIPE)


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
