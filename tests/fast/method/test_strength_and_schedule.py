"""What Apply PVA's strength and start/end_percent do, on a real ComfyUI UNet (tiny SD1.5, random).

- strength s multiplies the identity tokens' share of attention: near 0 the fused attention
  (not the strength-0 shortcut, which skips it) gives nearly the base model, and the change it
  makes grows in proportion to s.
- start/end_percent switch the identity on inside the window only, with ComfyUI's convention
  for percents of the schedule (0 = the first, noisiest step; 1 = the last): checked in a real
  KSampler run against the step positions of ComfyUI's "normal" scheduler, which spaces the
  steps evenly over the model's timesteps.
"""

import comfy.sample
import pytest
import torch
from harness.models import identity_tokens, run_unet, text_conditioning, tiny_model, unet_inputs

import pva.method.patching
from pva.method.model import PVAModel
from pva.method.patching import apply_identity


@pytest.fixture(scope="module")
def sd15():
    model = tiny_model("sd15", seed=11)
    return model, PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused (identity) attention ran."""
    calls = []
    fused = pva.method.patching.parallel_attention
    monkeypatch.setattr(
        pva.method.patching,
        "parallel_attention",
        lambda q, *rest: calls.append(q.shape[0]) or fused(q, *rest),
    )
    return calls


def test_near_zero_strength_through_the_fused_attention_is_nearly_the_base_model(sd15, fused_calls):
    model, weights = sd15
    inputs = unet_inputs(model)
    tokens = identity_tokens(weights, 1)
    base = run_unet(model, inputs)

    def change(strength):
        fused_calls.clear()
        out = run_unet(apply_identity(model, weights, tokens, strength=strength), inputs)
        assert fused_calls, f"strength {strength} did not run the fused attention"
        return (out.double() - base.double()).abs().mean().item()

    full, small, double_small = change(1.0), change(1e-4), change(2e-4)
    # Measured: full 4.8e-2, small 5.9e-6 (1.2e-4 x full), double_small / small 1.993. The
    # identity's share of attention is s * exp(score) / (...), so for small s the change is
    # linear in s.
    assert full > 1e-3, full
    assert 0 < small < 1e-3 * full, (small, full)
    assert double_small / small == pytest.approx(2.0, rel=0.01), (small, double_small)
    # Zero identity tokens still take attention mass from the text (measured: 3.6e-3 at strength
    # 1): strength must scale that share away too, not only the identity's values.
    zero_tokens = torch.zeros_like(tokens)
    shifted = run_unet(apply_identity(model, weights, zero_tokens, strength=1e-4), inputs)
    assert (shifted.double() - base.double()).abs().mean().item() < 1e-3 * full


def _sample(model, steps, seed=3):
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = text_conditioning(model, seed=7)
    negative = text_conditioning(model, seed=8)
    return comfy.sample.sample(
        model, noise, steps, 1.0, "euler", "normal", positive, negative, latent, denoise=1.0, seed=seed
    )


@pytest.mark.parametrize(
    "start, end, acting_steps",
    [
        # normal scheduler, 10 steps: step i sits at i/9 of the schedule
        (0.2, 0.5, {2, 3, 4}),  # 0.222, 0.333, 0.444
        (0.0, 0.3, {0, 1, 2}),  # 0.0, 0.111, 0.222
        (0.6, 1.0, {6, 7, 8, 9}),  # 0.667 ... 1.0
        (0.0, 1.0, set(range(10))),
    ],
)
def test_start_and_end_percent_switch_the_identity_on_inside_the_window(
    sd15, fused_calls, start, end, acting_steps
):
    model, weights = sd15
    steps = 10
    patched = apply_identity(
        model, weights, identity_tokens(weights, 1), start_percent=start, end_percent=end
    )
    per_step = []

    def count_identity_layers(apply_model, args):
        before = len(fused_calls)
        out = apply_model(args["input"], args["timestep"], **args["c"])
        per_step.append(len(fused_calls) - before)
        return out

    patched.set_model_unet_function_wrapper(count_identity_layers)
    sampled = _sample(patched, steps)
    assert len(per_step) == steps  # cfg 1: one model call per step
    assert {i for i, calls in enumerate(per_step) if calls} == acting_steps, per_step
    # where it acts, it acts in every cross-attention layer
    assert {calls for calls in per_step if calls} == {len(weights.layers)}, per_step
    # and it changes what is sampled (the same seed without the identity is the base model)
    unpatched = model.clone()
    unpatched.set_model_unet_function_wrapper(lambda apply, a: apply(a["input"], a["timestep"], **a["c"]))
    base = _sample(unpatched, steps)
    assert (sampled - base).abs().mean() > 1e-4


def test_percent_maps_to_the_models_noise_levels(sd15):
    """The window's edges in noise levels: ComfyUI's percent -> sigma of the model's schedule.
    Just above the start's sigma the identity is off, just below it on; likewise at the end."""
    model, weights = sd15
    sampling = model.get_model_object("model_sampling")
    inputs = unet_inputs(model)
    base = run_unet(model, inputs)
    patched = apply_identity(model, weights, identity_tokens(weights, 1), start_percent=0.25, end_percent=0.6)
    # Independent of percent_to_sigma: percent p of a discrete schedule is timestep (1 - p) * 999.
    high = float(sampling.sigma(torch.tensor(0.75 * 999.0)))
    low = float(sampling.sigma(torch.tensor(0.40 * 999.0)))

    def acts(sigma):
        out = run_unet(patched, inputs, {"sigmas": torch.full((2,), sigma)})
        return (out - base).abs().max().item() > 1e-5

    assert [acts(s) for s in (high * 1.01, high * 0.99, (high * low) ** 0.5, low * 1.01, low * 0.99)] == [
        False,
        True,
        True,
        True,
        False,
    ]
