"""Quick personalization on real ComfyUI model classes (tiny SD1.5-inpainting UNet, tiny VAE)."""

import hashlib
import math

import comfy.model_management
import pytest
import torch
from harness.models import text_conditioning, tiny_model, tiny_vae
from harness.people import synthetic_person

from pva.errors import PVAError
from pva.model import PVAModel
from pva.training import Personalizer, TrainingSettings, encode_inpaint_targets, personalize, training_mode

SETTINGS = dict(steps=40, learning_rate=2e-3, time_bins=4, seed=0)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("sd15", in_channels=9)
    vae = tiny_vae()
    positive = text_conditioning(model)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    person_a = synthetic_person((0.9, 0.2, 0.2), seed=1)
    person_b = synthetic_person((0.2, 0.3, 0.9), seed=2)
    return model, vae, positive, pva, person_a, person_b


def _held_out(model, vae, positive, pva, data, face_only=None):
    """Mean held-out loss over the person's photos, on fixed noise and timesteps."""
    with training_mode():
        targets = encode_inpaint_targets(data, vae, positive)
        with Personalizer(model, pva, data, targets, TrainingSettings(time_bins=8)) as run:
            return sum(run.held_out_loss(i, face_only=face_only) for i in range(data.count)) / data.count


def _checksum(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained_on_a(setup):
    model, vae, positive, pva, person_a, _ = setup
    checksum = _checksum(model)
    result = personalize(model, vae, positive, person_a, pva, TrainingSettings(**SETTINGS))
    return result, checksum


def test_forty_steps_lower_the_held_out_loss(setup, trained_on_a):
    model, vae, positive, pva, person_a, _ = setup
    result, _ = trained_on_a
    before = _held_out(model, vae, positive, pva, person_a)
    after = _held_out(model, vae, positive, result.pva, person_a)
    assert len(result.losses) == 40
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_training_on_one_person_helps_that_person_not_another(setup):
    """Personalization learns *this* person. On a base that already inpaints (random weights
    cannot show it: see harness/pretrained.py), 40 steps on one person lower that person's
    face-region loss clearly and leave the other's about where it was, and each person is
    served best by their own model."""
    from harness.pretrained import pretrained_inpainting_model

    _, vae, positive, _, person_a, person_b = setup
    people = {"a": person_a, "b": person_b}
    model = pretrained_inpainting_model(vae, positive)
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    settings = TrainingSettings(steps=40, learning_rate=1e-3, batch_size=3, time_bins=4, seed=0)
    trained = {
        name: personalize(model, vae, positive, data, start, settings).pva for name, data in people.items()
    }
    before = {
        name: _held_out(model, vae, positive, start, data, face_only=True) for name, data in people.items()
    }
    after = {
        (model_of, name): _held_out(model, vae, positive, weights, data, face_only=True)
        for model_of, weights in trained.items()
        for name, data in people.items()
    }
    for own, other in (("a", "b"), ("b", "a")):
        gain_own = before[own] / after[own, own]
        gain_other = before[other] / after[own, other]
        assert gain_own >= 1.06, (own, before, after)
        assert gain_own - gain_other >= 0.06, (own, before, after)
        assert after[own, own] <= 0.95 * after[other, own], (own, before, after)


def test_base_weights_and_input_pva_are_unchanged(setup, trained_on_a):
    model, _, _, pva, _, _ = setup
    result, checksum = trained_on_a
    assert _checksum(model) == checksum
    assert not any(type(m).__name__ == "ParallelCrossAttention" for m in model.model.modules())
    assert all(not p.requires_grad for p in result.pva.parameters())
    fresh = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    assert all(
        torch.equal(a, b) for a, b in zip(pva.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert result.pva.provenance["personalized"]["steps"] == 40


def test_same_seed_gives_bit_identical_weights(setup):
    model, vae, positive, pva, person_a, _ = setup
    short = TrainingSettings(steps=2, learning_rate=1e-3, seed=5)
    one = personalize(model, vae, positive, person_a, pva, short).pva.state_dict()
    two = personalize(model, vae, positive, person_a, pva, short).pva.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = personalize(
        model, vae, positive, person_a, pva, TrainingSettings(steps=2, learning_rate=1e-3, seed=6)
    )
    assert any(not torch.equal(one[k], other.pva.state_dict()[k]) for k in one)


def test_model_loaded_in_inference_mode_trains_without_copying_its_weights(setup):
    """ComfyUI's loaders run under inference mode, so the base weights are inference tensors,
    which autograd cannot save. Training reads them through aliases (no second copy of the
    UNet in memory) and leaves the originals in place, unchanged."""
    _, vae, positive, _, person_a, _ = setup
    with torch.inference_mode():
        model = tiny_model("sd15", in_channels=9, seed=3)
    weights = dict(model.model.diffusion_model.named_parameters())
    assert all(w.is_inference() for w in weights.values())
    pointers = {name: w.data_ptr() for name, w in weights.items()}
    checksum = _checksum(model)
    seen = {}

    def record(step, loss):
        for name, w in model.model.diffusion_model.named_parameters():
            seen[name] = (w.is_inference(), w.data_ptr(), w.requires_grad)

    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    personalize(
        model, vae, positive, person_a, pva, TrainingSettings(steps=2, learning_rate=1e-3), on_step=record
    )
    assert seen.keys() == pointers.keys()
    assert all(
        not inference and ptr == pointers[name] and not grad for name, (inference, ptr, grad) in seen.items()
    )
    assert all(w is weights[name] for name, w in model.model.diffusion_model.named_parameters())
    assert _checksum(model) == checksum


def test_partially_loaded_model_trains_the_same(setup, monkeypatch):
    """On a GPU short of memory ComfyUI loads the UNet partially and streams the rest of the
    weights layer by layer (comfy.ops casting). On CPU it never chooses to, so the test makes
    ComfyUI's own loader do it with a tiny budget: the training must give the same weights."""
    _, vae, positive, _, person_a, _ = setup
    with torch.inference_mode():
        model = tiny_model("sd15", in_channels=9, seed=4)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    settings = TrainingSettings(steps=2, learning_rate=1e-3)
    full = personalize(model, vae, positive, person_a, pva, settings).pva
    requested, streamed = [], []

    def load_partially(models, memory_required=0, **kwargs):
        requested.append(memory_required)
        for patcher in models:
            loaded = comfy.model_management.LoadedModel(patcher)
            loaded.model_load(lowvram_model_memory=64 * 2**10)
            comfy.model_management.current_loaded_models.insert(0, loaded)

    def count_streamed(step, loss):
        streamed.append(sum(getattr(m, "comfy_cast_weights", False) for m in model.model.modules()))

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_partially)
    partial = personalize(model, vae, positive, person_a, pva, settings, on_step=count_streamed).pva
    assert min(streamed) > 10, streamed
    assert requested[-1] > 0, "the training's activation memory was not requested from ComfyUI"
    assert not any(getattr(m, "comfy_cast_weights", False) for m in model.model.modules())
    for a, b in zip(full.parameters(), partial.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_activation_memory_estimate_scales_with_the_step(setup):
    model, vae, positive, pva, person_a, _ = setup
    with training_mode():
        targets = encode_inpaint_targets(person_a, vae, positive)

        def estimate(**settings):
            return Personalizer(
                model, pva, person_a, targets, TrainingSettings(**settings)
            ).activation_memory()

        plain = estimate(time_bins=4)
        assert estimate(time_bins=8) == 2 * plain
        assert estimate(time_bins=4, gradient_checkpointing=True) < plain / 3

        def total(train):
            return Personalizer(
                model, pva, person_a, targets, TrainingSettings(train=train)
            ).training_memory()

        # trained parameters also hold fp32 gradients and AdamW's two moments (12 more bytes each)
        encoder = sum(p.numel() for p in pva.identity_encoder.parameters())
        assert total("both") - total("projections") == 12 * encoder
        assert total("projections") > plain + 16 * sum(p.numel() for p in pva.projections.parameters())


@pytest.mark.parametrize("sampling", ["edm", "v_prediction"])
def test_continuous_noise_schedules_train(setup, sampling):
    """Models with a continuous schedule (Playground v2.5, CosXL, or any MODEL through
    ComfyUI's ModelSamplingContinuousEDM node) draw their noise levels from their own schedule."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    model, vae, positive, pva, person_a, _ = setup
    (continuous,) = ModelSamplingContinuousEDM().patch(model, sampling, sigma_max=120.0, sigma_min=0.002)
    result = personalize(
        continuous, vae, positive, person_a, pva, TrainingSettings(steps=3, learning_rate=1e-3)
    )
    assert all(math.isfinite(loss) and 0 < loss < 100 for loss in result.losses), result.losses


def test_only_the_chosen_parameters_train(setup):
    model, vae, positive, pva, person_a, _ = setup
    settings = TrainingSettings(steps=2, learning_rate=1e-3, train="projections")
    trained = personalize(model, vae, positive, person_a, pva, settings).pva
    assert all(
        torch.equal(a, b)
        for a, b in zip(trained.identity_encoder.parameters(), pva.identity_encoder.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trained.projections.parameters(), pva.projections.parameters(), strict=True)
    )


def test_gradient_checkpointing_gives_the_same_step(setup):
    model, vae, positive, pva, person_a, _ = setup
    plain = personalize(
        model, vae, positive, person_a, pva, TrainingSettings(steps=1, learning_rate=1e-3)
    ).pva
    checkpointed = personalize(
        model,
        vae,
        positive,
        person_a,
        pva,
        TrainingSettings(steps=1, learning_rate=1e-3, gradient_checkpointing=True),
    ).pva
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-6
    assert not any("forward" in vars(m) for m in model.model.modules()), (
        "checkpointing left a patched forward"
    )


def test_gradient_checkpointing_recomputes_with_the_layers_own_block_options(setup):
    """Attention patches keyed by block (as many packs set them) must act in the recomputed
    forward as they did in the first one, or checkpointing silently changes the gradients."""
    model, vae, positive, pva, person_a, _ = setup
    from comfy.ldm.modules.attention import optimized_attention

    calls = []

    def damped_attention(q, k, v, extra):
        calls.append(extra["block"])
        return optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    patched = model.clone()
    for index in (1, 3):
        patched.set_model_attn1_replace(damped_attention, "input", index)
    results = {}
    for checkpointing in (False, True):
        settings = TrainingSettings(
            steps=1, learning_rate=1e-3, time_bins=2, gradient_checkpointing=checkpointing
        )
        calls.clear()
        results[checkpointing] = personalize(patched, vae, positive, person_a, pva, settings).pva
        assert sorted(calls) == sorted([("input", 1), ("input", 3)] * (1 + checkpointing)), calls
    for a, b in zip(results[False].parameters(), results[True].parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_interrupt_stops_cleanly(setup):
    model, vae, positive, pva, person_a, _ = setup
    checksum = _checksum(model)

    def interrupt_at_third_step(step, loss):
        if step == 2:
            comfy.model_management.interrupt_current_processing()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        personalize(
            model, vae, positive, person_a, pva, TrainingSettings(steps=10), on_step=interrupt_at_third_step
        )
    assert not comfy.model_management.processing_interrupted()
    assert _checksum(model) == checksum
    assert not any(type(m).__name__ == "ParallelCrossAttention" for m in model.model.modules())
    assert not any(
        loaded.model is not None and loaded.model.object_patches
        for loaded in comfy.model_management.current_loaded_models
    )


def test_bad_inputs_are_explained(setup):
    model, vae, positive, pva, person_a, _ = setup
    with pytest.raises(PVAError, match="steps"):
        personalize(model, vae, positive, person_a, pva, TrainingSettings(steps=0))
    with pytest.raises(PVAError, match="train"):
        personalize(model, vae, positive, person_a, pva, TrainingSettings(train="everything"))
    with pytest.raises(PVAError, match=r"vae: it makes 16-channel latents but the MODEL \(SD15\) works on 4"):
        personalize(model, tiny_vae(latent_channels=16), positive, person_a, pva, TrainingSettings(steps=1))
    sd20 = PVAModel.initialize_from(tiny_model("sd20", in_channels=9), num_tokens=4, encoder_depth=1)
    with pytest.raises(PVAError, match="made for SD2.x"):
        personalize(model, vae, positive, person_a, sd20, TrainingSettings(steps=1))


def test_references_without_faces_or_none_at_all_are_explained():
    from facenet_pytorch import InceptionResnetV1

    from pva.errors import NoFaceFoundError
    from pva.training_data import prepare_personalization_data

    facenet = InceptionResnetV1().eval()
    with pytest.raises(PVAError, match="reference_images: the batch is empty"):
        prepare_personalization_data(torch.zeros(0, 64, 64, 3), facenet)
    with pytest.raises(NoFaceFoundError, match="reference photo 1 of 2: no face found"):
        prepare_personalization_data(torch.full((2, 96, 96, 3), 0.5), facenet)


def test_model_without_cross_attention_is_explained():
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.SD15(
        dict(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=[1],
            channel_mult=[1],
            transformer_depth=[0],
            transformer_depth_middle=0,
            transformer_depth_output=[0, 0],
            use_spatial_transformer=False,
            context_dim=None,
            num_heads=1,
            legacy=False,
            adm_in_channels=None,
            use_temporal_attention=False,
            use_temporal_resblock=False,
        )  # fmt: skip
    )
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    with pytest.raises(PVAError, match="no cross-attention layers"):
        PVAModel.initialize_from(patcher)
