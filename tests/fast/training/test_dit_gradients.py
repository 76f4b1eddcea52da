"""Training through ComfyUI's Flux: its blocks add to their residual streams in place, which
autograd refuses; the pack's training context makes the backward pass possible, and its gradients
are the true ones (checked against finite differences in float64)."""

import copy

import comfy.patcher_extension
import pytest
import torch
from harness.models import dit_conditioning, flux_inputs, tiny_flux, tiny_qwen_image, tiny_vae
from harness.people import synthetic_person

from pva.host.mmdit import differentiable_residuals, host_training
from pva.method.model import PVAModel
from pva.method.patching import apply_identity
from pva.training.personalize import Personalizer, TrainingSettings, encode_inpaint_targets
from pva.training.session import training_mode


def _loss_of(patched, inputs):
    options = dict(patched.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    with host_training():  # newer hosts' comfy_kitchen RoPE takes no float64 outside training
        return patched.model.diffusion_model(**inputs, transformer_options=options).pow(2).sum()


@pytest.mark.parametrize("variant", ["flux", "flux2", "qwen-image"])
def test_gradients_through_the_in_place_blocks_match_finite_differences(variant):
    model = (
        tiny_qwen_image(dtype=torch.float64)
        if variant == "qwen-image"
        else tiny_flux(variant, dtype=torch.float64)
    )
    model.model.diffusion_model.to(torch.float64)
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1).double()
    patched = apply_identity(model, pva, torch.randn(1, 4, 64, dtype=torch.float64))
    inputs = {k: t.double() if t.is_floating_point() else t for k, t in flux_inputs(model, batch=1).items()}
    weights = [getattr(pva.projections_for(s.name), p).weight for s in pva.layers for p in ("to_q", "to_k")]
    with torch.inference_mode(False), torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        if variant != "qwen-image":  # (Qwen-Image's blocks add out of place)
            with pytest.raises(
                RuntimeError, match="modified by an inplace operation"
            ):  # the host's own blocks
                _loss_of(patched, inputs).backward()
        for w in weights:
            w.grad = None
        with differentiable_residuals(model.model.diffusion_model):
            loss = _loss_of(patched, inputs)
        loss.backward()
        for w in weights:
            w.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in weights]
    predicted = sum((w.grad * d).sum().item() for w, d in zip(weights, directions, strict=True))
    eps, originals = 1e-3, [w.clone() for w in weights]
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for w, d, o in zip(weights, directions, originals, strict=True):
                w.copy_(o + sign * eps * d)
            values.append(_loss_of(patched, inputs).item())
        for w, o in zip(weights, originals, strict=True):
            w.copy_(o)
    measured = (values[0] - values[1]) / (2 * eps)
    # measured: 4e-5 (Flux) and 9e-4 (Flux.2) relative, the finite difference's own error (RoPE in float32)
    assert abs(predicted - measured) <= 5e-3 * abs(measured), (predicted, measured)
    assert abs(predicted) > 1.0


def test_gradient_checkpointing_gives_the_same_gradients_on_flux():
    model = tiny_flux("flux-fill")
    vae = tiny_vae(latent_channels=16)
    positive = dit_conditioning(model)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    person = synthetic_person((0.9, 0.2, 0.2), seed=1)
    gradients = []
    for checkpointing in (False, True):
        with training_mode():
            targets = encode_inpaint_targets(person, vae, positive)
            settings = TrainingSettings(gradient_checkpointing=checkpointing)
            with Personalizer(model, copy.deepcopy(pva), person, targets, settings) as run:
                run.pva.eval()
                run.target_loss(0, torch.Generator().manual_seed(0)).backward()
                gradients.append(
                    {n: p.grad.clone() for n, p in run.pva.named_parameters() if p.requires_grad}
                )
    plain, checkpointed = gradients
    scale = max(g.abs().max().item() for g in plain.values())
    assert scale > 0 and all(g.abs().max() > 0 for g in plain.values()), "a parameter got no gradient"
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-5 * scale
    assert not any("forward" in vars(m) for m in model.model.modules()), (
        "checkpointing left a patched forward"
    )


def test_training_on_qwen_image_is_refused_with_a_reason():
    """Its Wan VAE's latents are [B, C, T, H, W]; the training data path is for image latents."""
    from pva.errors import PVAError
    from pva.training.personalize import personalize

    model = tiny_qwen_image()
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    positive = dit_conditioning(model)
    with pytest.raises(
        PVAError, match=r"training on QwenImage is not supported yet .*Apply PVA Identity works"
    ):
        personalize(
            model,
            tiny_vae(latent_channels=16),
            positive,
            synthetic_person((0.9, 0.2, 0.2), seed=1),
            pva,
            TrainingSettings(steps=1),
        )
