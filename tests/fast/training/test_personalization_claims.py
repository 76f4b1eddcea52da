"""What the README says quick personalization does, each checked on real ComfyUI model classes
(tiny UNets of the SD1.x / SD2.x / SDXL architectures, random weights):

- it trains SD2.x (inpainting, and the 768-v non-inpainting model) and SDXL, not only SD1.5;
- with a regular (non-inpainting) MODEL the loss counts the face region only, with an
  inpainting MODEL the whole latent (the paper's setting);
- a single photo is reconstructed from its mirror image, several photos from each other;
- each step uses one timestep from each of `time_bins` equal bins of the schedule;
- a half-precision UNet trains the float32 PVA parameters, and mixed_precision "auto" leaves a
  CPU run in the model's own dtype (its bf16 autocast is for GPUs with native bf16).
"""

import comfy.samplers
import pytest
import torch
from facenet_pytorch import InceptionResnetV1
from harness.models import text_conditioning, tiny_model, tiny_vae
from harness.people import synthetic_person
from harness.personalization import held_out_loss
from harness.portraits import portrait

import pva.method.patching
from pva.faces.embeddings import embed_photos
from pva.faces.facenet import embed_faces
from pva.method.encoder import IdentityEncoder
from pva.method.model import PVAModel
from pva.training.data import PersonalizationData, prepare_personalization_data
from pva.training.personalize import (
    Personalizer,
    TrainingSettings,
    encode_inpaint_targets,
    personalize,
)
from pva.training.session import training_mode


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def person():
    return synthetic_person((0.9, 0.2, 0.2), seed=1)


# -- model families ----------------------------------------------------------------------------


# -- the loss ----------------------------------------------------------------------------------
def _loss_with_denoised_bumped(monkeypatch, model, vae, person, where):
    """Held-out loss of photo 0 after adding sigma to the model's prediction in one part of the
    latent: "outside" the face (latent cells with no face pixel), "inside" it (cells all face),
    or nowhere (None)."""
    positive = text_conditioning(model)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    calc = comfy.samplers.calc_cond_batch

    def bumped(model_, conds, x, sigmas, options):
        out = calc(model_, conds, x, sigmas, options)
        if where is None:
            return out
        cells = torch.nn.functional.adaptive_avg_pool2d(person.masks[0][None, None], x.shape[-2:])
        region = (cells == 0) if where == "outside" else (cells == 1)
        assert region.any()
        return [out[0] + sigmas.view(-1, 1, 1, 1) * region.to(out[0].dtype)] + out[1:]

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", bumped)
    with training_mode():
        targets = encode_inpaint_targets(person, vae, positive)
        with Personalizer(model, pva, person, targets, TrainingSettings(time_bins=4)) as run:
            return run.held_out_loss(0)


@pytest.mark.parametrize("in_channels", [4, 9], ids=["regular", "inpainting"])
def test_a_regular_model_learns_from_the_face_region_only(monkeypatch, vae, person, in_channels):
    model = tiny_model("sd15", in_channels=in_channels)
    loss = {
        where: _loss_with_denoised_bumped(monkeypatch, model, vae, person, where)
        for where in (None, "outside", "inside")
    }
    # An error of 1 (in noise units) added inside the face raises the loss either way.
    assert loss["inside"] > 1.2 * loss[None], loss
    if in_channels == 4:
        assert loss["outside"] == loss[None], loss  # the background does not count at all
    else:
        assert loss["outside"] > 1.2 * loss[None], loss  # the whole latent counts


# -- references ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def facenet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return InceptionResnetV1().eval()


def _photo(name):
    return torch.from_numpy(portrait(name)).float().div(255)[None]


def test_a_single_photo_is_reconstructed_from_its_mirror_image(facenet, monkeypatch):
    photo = _photo("astronaut")
    data = prepare_personalization_data(photo, facenet, resolution=64)
    assert data.count == 1
    face = embed_photos(photo, facenet).crops  # the aligned face FaceNet saw
    mirror, own = embed_faces(facenet, face.flip(-1)), embed_faces(facenet, face)
    # Random FaceNet weights: the mirror's embedding differs from the photo's own by up to 4e-4.
    assert (mirror - own).abs().max() > 1e-4
    assert torch.allclose(data.references_for(0), mirror, atol=1e-6, rtol=0)
    # and the training's identity encoder sees exactly that embedding
    seen = []
    forward = IdentityEncoder.forward
    monkeypatch.setattr(
        IdentityEncoder, "forward", lambda self, x: seen.append(x.clone()) or forward(self, x)
    )
    model = tiny_model("sd15", in_channels=9)
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    personalize(model, tiny_vae(), text_conditioning(model), data, start, TrainingSettings(steps=2))
    assert seen and all(torch.equal(x.cpu(), data.references_for(0)) for x in seen)


def test_several_photos_are_reconstructed_from_each_other(facenet):
    photos = [_photo("astronaut")[0], _photo("freckles")[0]]
    data = prepare_personalization_data(photos, facenet, resolution=64)
    assert data.count == 2
    assert torch.equal(data.references_for(0), data.embeddings[1:])
    assert torch.equal(data.references_for(1), data.embeddings[:1])


def test_mirrored_targets_never_see_their_own_photo(monkeypatch, vae):
    """Flip augmentation: each photo and its mirror image are targets (the mirror's pixels and
    mask flipped), each reconstructed from the *other* photos' embeddings only, never its own
    photo's nor that photo's mirror (that would leak the answer); one photo alone keeps the
    method's rule, its mirror image's embedding. Training with `mirror` reaches every target."""
    three = synthetic_person((0.8, 0.3, 0.3), seed=3)
    mirrored = three.with_mirrored_targets()
    assert (mirrored.count, mirrored.photos) == (6, 3) and mirrored.with_mirrored_targets() is mirrored
    assert torch.equal(mirrored.pixels[4], three.pixels[1].flip(1)) and torch.equal(
        mirrored.masks[4], three.masks[1].flip(1)
    )
    for target in range(6):
        photo = target % 3
        assert torch.equal(mirrored.references_for(target), three.references_for(photo))
    one = PersonalizationData(
        three.pixels[:1], three.masks[:1], three.embeddings[:1], three.flipped_embeddings[:1]
    )
    alone = one.with_mirrored_targets()
    assert torch.equal(alone.references_for(0), one.flipped_embeddings)  # the photo from its mirror
    assert torch.equal(alone.references_for(1), one.embeddings)  # the mirror from the photo
    seen = []
    monkeypatch.setattr(Personalizer, "target_loss", _recording(Personalizer.target_loss, seen))
    model = tiny_model("sd15", in_channels=9)
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    result = personalize(
        model, vae, text_conditioning(model), three, start, TrainingSettings(steps=6, mirror=True)
    )
    assert seen == list(range(6)) and result.pva.provenance["personalized"]["mirror"] is True


def _recording(target_loss, seen: list):  # noqa: ANN001, ANN202
    def recorded(self, target, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(target)
        return target_loss(self, target, *args, **kwargs)

    return recorded


# -- time-stratified sampling ----------------------------------------------------------------------
def test_each_step_draws_one_timestep_from_each_bin(monkeypatch, vae, person):
    model = tiny_model("sd15", in_channels=9)
    sampling = model.get_model_object("model_sampling")
    calls = []
    calc = comfy.samplers.calc_cond_batch

    def record(model_, conds, x, sigmas, options):
        calls.append((len(conds), x.shape[0], sampling.timestep(sigmas.cpu())))
        return calc(model_, conds, x, sigmas, options)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", record)
    bins, steps = 4, 6
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    personalize(
        model, vae, text_conditioning(model), person, start, TrainingSettings(steps=steps, time_bins=bins)
    )
    assert len(calls) == steps
    width = 1000 / bins
    per_step = []
    for conds, batch, timesteps in calls:
        assert conds == 1 and batch == bins  # one target, all its noise levels in one batch
        timesteps = timesteps.sort().values
        which = (timesteps / width).floor()
        assert which.tolist() == list(range(bins)), timesteps  # one in each bin
        per_step.append((timesteps - which * width).tolist())
    # Within its bin each timestep is drawn anew every step (integer timesteps: a repeat among
    # 6 draws of 250 happens), anywhere in the bin.
    for k, offsets in enumerate(zip(*per_step, strict=True)):
        assert len(set(offsets)) >= steps - 1, (k, offsets)
    offsets = [o for step in per_step for o in step]
    assert min(offsets) < 0.25 * width and max(offsets) > 0.75 * width, offsets


# -- precision ---------------------------------------------------------------------------------------
def test_a_half_precision_model_trains_float32_pva_parameters(monkeypatch, vae, person):
    model = tiny_model("sd15", in_channels=9, dtype=torch.bfloat16)
    positive = text_conditioning(model)
    dtypes = []
    fused = pva.method.patching.parallel_attention
    monkeypatch.setattr(
        pva.method.patching, "parallel_attention", lambda q, *rest: dtypes.append(q.dtype) or fused(q, *rest)
    )
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    runs = {
        precision: personalize(
            model,
            vae,
            positive,
            person,
            start,
            TrainingSettings(steps=6, learning_rate=5e-3, time_bins=2, mixed_precision=precision),
        )
        for precision in ("none", "auto")
    }
    assert set(dtypes) == {torch.bfloat16}  # the attention ran in the model's dtype
    for result in runs.values():
        assert all(p.dtype == torch.float32 for p in result.pva.parameters())
    # On CPU "auto" is the model's own dtype: the very same training.
    none, auto = runs["none"].pva.state_dict(), runs["auto"].pva.state_dict()
    assert all(torch.equal(none[k], auto[k]) for k in none)
    # and it learns through the bf16 UNet (measured: 0.93 x the loss before; fp32: 0.86)
    before = held_out_loss(model, vae, positive, start, person, time_bins=4)
    after = held_out_loss(model, vae, positive, runs["none"].pva, person, time_bins=4)
    assert after < 0.96 * before, (before, after)
