"""Quick personalization measured where a trained base or the full-size layout is needed: it
learns *this* person (on a tiny base taught to inpaint), and its memory request fits the
SD1.5-inpainting UNet it was measured on."""

import gc

import pytest
from harness.artefacts import world_seed
from harness.models import text_conditioning, tiny_vae
from harness.people import synthetic_person
from harness.personalization import held_out_loss, saved_for_backward

from pva.method.model import PVAModel
from pva.training.personalize import TrainingSettings, personalize


@pytest.fixture(scope="module")
def people():
    return {
        "a": synthetic_person((0.9, 0.2, 0.2), seed=world_seed(1)),
        "b": synthetic_person((0.2, 0.3, 0.9), seed=world_seed(2)),
    }


@pytest.mark.test_models("people-base")
@pytest.mark.slow
@pytest.mark.claims
def test_training_on_one_person_helps_that_person_not_another(people):
    """Personalization learns *this* person. On a base that already inpaints (random weights
    cannot show it: see harness/pretrained.py), 40 steps on one person lower that person's
    face-region loss, clearly more than the other person's, and each person is served better by
    their own model than by the other's.

    Bounds from the spread over three independently seeded worlds (PVA_TEST_WORLD_SEED 0, 1, 2;
    `-m claims -s` prints the figures), six trained-person / other-person pairs, loss before /
    after: own gain 1.009 .. 1.153; the other's 0.863 .. 1.033 (so the other person's loss does
    move, by up to 14%: "it stays put" is not a claim this holds); own gain minus the other's
    0.108 .. 0.146 (bound 0.06); own model's loss / the other model's on that person 0.78 ..
    0.962 (bound 0.98)."""
    from harness.pretrained import pretrained_inpainting_model

    model, vae, positive = pretrained_inpainting_model()
    start = PVAModel.initialize_from(model, num_tokens=4, seed=world_seed(0), encoder_depth=1)
    settings = TrainingSettings(steps=40, learning_rate=1e-3, batch_size=3, time_bins=4, seed=world_seed(0))
    trained = {
        name: personalize(model, vae, positive, data, start, settings).pva for name, data in people.items()
    }
    before = {
        name: held_out_loss(model, vae, positive, start, data, face_only=True)
        for name, data in people.items()
    }
    after = {
        (model_of, name): held_out_loss(model, vae, positive, weights, data, face_only=True)
        for model_of, weights in trained.items()
        for name, data in people.items()
    }
    for own, other in (("a", "b"), ("b", "a")):
        gain_own = before[own] / after[own, own]
        gain_other = before[other] / after[own, other]
        served = after[own, own] / after[other, own]
        print(
            f"\n[personalization] trained on {own}: own gain {gain_own:.4f}, {other}'s {gain_other:.4f}, own/other model {served:.4f}"
        )
        assert gain_own > 1.0, (own, before, after)
        assert gain_own - gain_other >= 0.06, (own, before, after)
        assert served <= 0.98, (own, before, after)


def test_memory_request_fits_the_sd15_inpainting_unet(sd15_inpaint_ckpt):
    """On the UNet the constants were measured on (the SD1.5-inpainting layout, random weights,
    fp32 on CPU, 256 px): the request covers what autograd keeps, and is not far above it (a
    stale, too large request makes ComfyUI unload models for nothing)."""
    import comfy.sd

    model, *_ = comfy.sd.load_checkpoint_guess_config(
        str(sd15_inpaint_ckpt), output_vae=False, output_clip=False
    )
    try:
        person = synthetic_person((0.9, 0.2, 0.2), seed=1, count=1, resolution=256)
        vae, positive = tiny_vae(), text_conditioning(model)
        pva = PVAModel.initialize_from(model, num_tokens=10, seed=0)
        plain, plain_request = saved_for_backward(model, vae, positive, pva, person, time_bins=1)
        kept, request = saved_for_backward(
            model, vae, positive, pva, person, time_bins=1, gradient_checkpointing=True
        )
    finally:
        del model
        gc.collect()
    print(
        f"\n[memory] kept for backward per 256-px sample: {plain / 2**20:.0f} MiB of {plain_request / 2**20:.0f} MiB requested; checkpointed {kept / 2**20:.0f} of {request / 2**20:.0f} MiB"
    )
    assert 0.5 * plain_request <= plain <= plain_request, (plain, plain_request)
    # With checkpointing the request also covers recomputing the largest layer in the backward.
    assert 0.1 * request <= kept <= request, (kept, request)
