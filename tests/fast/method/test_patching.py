"""Parallel visual attention on real ComfyUI UNets (SD1.x, SD2.x, SD2.x-v, SDXL; tiny, random)."""

import pytest
import torch
from harness.models import identity_tokens, run_unet, tiny_model, unet_inputs

from pva.errors import PVAError
from pva.method.attention import VisualKeys, parallel_attention_reference
from pva.method.model import PVAModel
from pva.method.patching import apply_identity

FAMILIES = ["sd15", "sd20", "sd20v", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    model = tiny_model(request.param)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    return request.param, model, pva


def test_initialized_from_model_copies_projections(family_setup):
    _, model, pva = family_setup
    modules = dict(model.model.diffusion_model.named_modules())
    assert len(pva.layers) >= 7
    for spec in pva.layers:
        for name in ("to_q", "to_k", "to_v"):
            assert torch.equal(
                getattr(pva.projections_for(spec.name), name).weight, getattr(modules[spec.name], name).weight
            )


def test_strength_zero_and_no_identity_equal_the_base_model(family_setup):
    _, model, pva = family_setup
    inputs = unet_inputs(model)
    base = run_unet(model, inputs)
    zero = apply_identity(model, pva, identity_tokens(pva, 1), strength=0.0)
    assert (run_unet(zero, inputs) - base).abs().max() <= 1e-6
    # identity present but outside the schedule (sigma window excludes this step)
    late = apply_identity(model, pva, identity_tokens(pva, 1), start_percent=0.9, end_percent=1.0)
    options = {"sigmas": torch.tensor([14.6, 14.6])}
    assert (run_unet(late, inputs, options) - base).abs().max() <= 1e-6
    # positive-only identity on an all-negative batch
    positive = apply_identity(model, pva, identity_tokens(pva, 1))
    assert (run_unet(positive, inputs, {"cond_or_uncond": [1]}) - base).abs().max() <= 1e-6


def test_identity_changes_output_and_unpatch_restores_model(family_setup):
    _, model, pva = family_setup
    inputs = unet_inputs(model)
    base = run_unet(model, inputs)
    state_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = apply_identity(model, pva, identity_tokens(pva, 1))
    out_a = run_unet(patched, inputs)
    out_b = run_unet(apply_identity(model, pva, identity_tokens(pva, 2)), inputs)
    assert (out_a - base).abs().max() > 1e-4
    assert (out_a - out_b).abs().max() > 1e-5, "two identities must give different outputs"
    # the user's MODEL is untouched and gives exactly its earlier output
    assert torch.equal(run_unet(model, inputs), base)
    after = model.model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)
    assert not any(type(m).__name__ == "ParallelCrossAttention" for m in model.model.modules())


def test_patched_state_dict_keys_unchanged(family_setup):
    """LoRA patches and low-VRAM loading address modules by name: the names must not move."""
    _, model, pva = family_setup
    patched = apply_identity(model, pva, identity_tokens(pva, 1))
    keys = set(model.model.state_dict().keys())
    patched.patch_model()
    try:
        assert set(patched.model.state_dict().keys()) == keys
    finally:
        patched.unpatch_model()


def test_positive_scope_leaves_negative_half_of_cfg_batch_alone():
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=2)
    options = {"cond_or_uncond": [1, 0]}  # first half uncond, second half cond
    base = run_unet(model, inputs, options)
    positive = run_unet(apply_identity(model, pva, identity_tokens(pva, 1)), inputs, options)
    both = run_unet(apply_identity(model, pva, identity_tokens(pva, 1), scope="both"), inputs, options)
    assert (positive[0] - base[0]).abs().max() <= 1e-5
    assert (positive[1] - base[1]).abs().max() > 1e-4
    assert (both[0] - base[0]).abs().max() > 1e-4
    # the cond half is what a cond-only batch gives: splitting the CFG batch changes nothing
    cond_only = run_unet(
        apply_identity(model, pva, identity_tokens(pva, 1)),
        {k: v[1:] for k, v in inputs.items()},
        {"cond_or_uncond": [0]},
    )
    assert (positive[1] - cond_only[0]).abs().max() <= 1e-5


def test_negative_scope_changes_only_the_uncond_rows_of_a_cfg_batch():
    """apply_to = negative (Face-Adapter's face swap: the target's own identity as the negative
    condition): the cond rows are the base model's bit for bit, the uncond rows are what the
    identity gives an uncond-only batch."""
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=4)
    options = {"cond_or_uncond": [1, 0]}  # rows 0-1 uncond, rows 2-3 cond
    base = run_unet(model, inputs, options)
    negative = run_unet(
        apply_identity(model, pva, identity_tokens(pva, 1), scope="negative"), inputs, options
    )
    assert torch.equal(negative[2:], base[2:]), (negative[2:] - base[2:]).abs().max()
    assert (negative[:2] - base[:2]).abs().amin(dim=(1, 2, 3)).min() > 0
    assert (negative[:2] - base[:2]).abs().max() > 1e-3
    uncond_only = run_unet(
        apply_identity(model, pva, identity_tokens(pva, 1), scope="both"),
        {k: v[:2] for k, v in inputs.items()},
        {"cond_or_uncond": [1]},
    )
    # (a batch of 2 instead of 4 rounds the convolutions differently: equal to float precision)
    assert (negative[:2] - uncond_only).abs().max() <= 1e-5
    # a cond-only batch, and a batch without CFG information (counted as positive), are untouched
    assert torch.equal(
        run_unet(
            apply_identity(model, pva, identity_tokens(pva, 1), scope="negative"),
            inputs,
            {"cond_or_uncond": [0]},
        ),
        run_unet(model, inputs, {"cond_or_uncond": [0]}),
    )
    assert torch.equal(
        run_unet(apply_identity(model, pva, identity_tokens(pva, 1), scope="negative"), inputs),
        run_unet(model, inputs),
    )


def test_negative_scope_without_splitting_the_batch_masks_the_cond_rows():
    """Per-sample tokens (as in training) keep the CFG batch whole: there the cond rows see the
    negative identity through a -inf bias, which must leave them the base model's."""
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=2)
    options = {"cond_or_uncond": [1, 0]}
    tokens = identity_tokens(pva, 1).expand(2, -1, -1)
    base = run_unet(model, inputs, options)
    negative = run_unet(apply_identity(model, pva, tokens, scope="negative"), inputs, options)
    assert (negative[1] - base[1]).abs().max() <= 1e-5
    assert (negative[0] - base[0]).abs().max() > 1e-3


def test_face_swap_identities_each_act_on_their_own_branch():
    """Source identity positive, target identity negative, chained: the cond rows are exactly
    the source-only model's, the uncond rows exactly the target-only model's."""
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=2)
    options = {"cond_or_uncond": [1, 0]}
    source, target = identity_tokens(pva, 1), identity_tokens(pva, 2)
    swap = apply_identity(apply_identity(model, pva, source), pva, target, scope="negative")
    swapped = run_unet(swap, inputs, options)
    source_only = run_unet(apply_identity(model, pva, source), inputs, options)
    target_only = run_unet(apply_identity(model, pva, target, scope="negative"), inputs, options)
    assert torch.equal(swapped[1], source_only[1])
    assert torch.equal(swapped[0], target_only[0])
    assert (source_only[0] - target_only[0]).abs().max() > 1e-3  # the two rows did differ


def test_uncond_half_skips_the_wide_attention(monkeypatch):
    """Positive-only identities: the uncond samples of a CFG batch take the original attention,
    so the fused (wider, costlier) call sees only the cond samples."""
    import pva.method.patching

    batches = []
    fused = pva.method.patching.parallel_attention
    monkeypatch.setattr(
        pva.method.patching,
        "parallel_attention",
        lambda q, *rest: batches.append(q.shape[0]) or fused(q, *rest),
    )
    model = tiny_model("sd15")
    weights = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=4)
    run_unet(apply_identity(model, weights, identity_tokens(weights, 1)), inputs, {"cond_or_uncond": [1, 0]})
    assert batches and set(batches) == {2}
    batches.clear()
    run_unet(
        apply_identity(model, weights, identity_tokens(weights, 1), scope="both"),
        inputs,
        {"cond_or_uncond": [1, 0]},
    )
    assert batches and set(batches) == {4}


def _capture_attention_inputs(patched, layer_name):
    """Record one layer's (x, context) during a run, to check it against the formula."""
    captured = {}
    patched.patch_model()
    module = patched.model.diffusion_model.get_submodule(layer_name)
    patched.unpatch_model()
    original_forward = module.forward

    def spy(x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        captured.update(x=x, context=context, options=dict(transformer_options), out=original_forward(
            x, context=context, value=value, mask=mask, transformer_options=transformer_options))  # fmt: skip
        return captured["out"]

    module.forward = spy
    return captured


def test_patched_layer_equals_reference_formula():
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    with torch.no_grad():  # make W' differ from W so that a mix-up would show
        for p in pva.projections.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = identity_tokens(pva, 5)
    patched = apply_identity(model, pva, tokens, strength=0.6)
    layer = pva.layers[2].name
    captured = _capture_attention_inputs(patched, layer)
    run_unet(patched, unet_inputs(model))
    module = model.model.diffusion_model.get_submodule(layer)  # original CrossAttention
    proj = pva.projections_for(layer)
    with torch.no_grad():
        x, c = captured["x"], captured["context"]
        visual = VisualKeys(proj.to_q(x), proj.to_k(tokens), proj.to_v(tokens), torch.log(torch.tensor(0.6)))
        expected = module.to_out(
            parallel_attention_reference(
                module.to_q(x), module.to_k(c), module.to_v(c), [visual], module.heads
            )
        )
    assert (captured["out"] - expected).abs().max() <= 1e-5


def _first_layer_output(patcher, layer, inputs):
    captured = _capture_attention_inputs(patcher, layer)
    run_unet(patcher, inputs)
    return captured["out"][0]  # [L, C] for the first sample


def test_chained_masked_identities_touch_only_their_regions():
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = unet_inputs(model, batch=1, size=16)
    left, right = torch.zeros(1, 128, 128), torch.zeros(1, 128, 128)
    left[:, :, :48] = 1.0
    right[:, :, 80:] = 1.0
    one = apply_identity(model, pva, identity_tokens(pva, 1), region=left)
    two = apply_identity(one, pva, identity_tokens(pva, 2), region=right)
    assert len(two.get_model_object(f"diffusion_model.{pva.layers[0].name}").pva_streams) == 2
    # The first cross-attention layer sees identical hidden states in every run, so its output
    # shows exactly where each identity acts (deeper layers mix positions through convolutions).
    layer = pva.layers[0].name
    base = _first_layer_output(model, layer, inputs).view(16, 16, -1)
    both = _first_layer_output(two, layer, inputs).view(16, 16, -1)
    only_left = _first_layer_output(one, layer, inputs).view(16, 16, -1)
    diff = (both - base).abs().amax(dim=-1)
    assert diff[:, 6:10].max() <= 1e-5, "outside both regions the layer is the base layer"
    assert diff[:, :6].min() > 1e-4 and diff[:, 10:].min() > 1e-4
    left_diff = (only_left - base).abs().amax(dim=-1)
    assert left_diff[:, 6:].max() <= 1e-5 and left_diff[:, :6].min() > 1e-4
    # where only the left identity acts, the chained model equals the left-only model
    assert (both[:, :6] - only_left[:, :6]).abs().max() <= 1e-5


def test_incompatible_pva_model_is_explained():
    sd15, sd20 = tiny_model("sd15"), tiny_model("sd20")
    pva = PVAModel.initialize_from(sd20, num_tokens=4, encoder_depth=1)
    with pytest.raises(
        PVAError, match=r"made for SD2.x \(SD20, 1024-d context\); the MODEL is SD1.x \(SD15, 768-d"
    ):
        apply_identity(sd15, pva, identity_tokens(pva, 1))


def test_bad_controls_are_named():
    model = tiny_model("sd15")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    tokens = identity_tokens(pva, 1)
    with pytest.raises(PVAError, match="strength"):
        apply_identity(model, pva, tokens, strength=-1)
    with pytest.raises(PVAError, match="start_percent"):
        apply_identity(model, pva, tokens, start_percent=0.8, end_percent=0.2)
    with pytest.raises(PVAError, match="mask"):
        apply_identity(model, pva, tokens, region=torch.zeros(1, 1, 8, 8))


def test_pva_made_inside_comfyuis_inference_mode_executor_works():
    """Nodes run under torch.inference_mode(): a PVA model made or loaded there must still
    sample (and train later)."""
    model = tiny_model("sd15")
    with torch.inference_mode():
        pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
        patched = apply_identity(model, pva, identity_tokens(pva, 1))
        out = run_unet(patched, unet_inputs(model))
    assert torch.isfinite(out).all()
    assert not any(p.is_inference() for p in pva.parameters())


@pytest.mark.parametrize("forced_upcast", [False, True])
def test_attention_upcast_follows_comfyuis_policy(monkeypatch, forced_upcast):
    """fp16 attention is computed in fp32 exactly where ComfyUI would upcast its own (e.g. its
    forced upcast on macOS >= 14.5), so the identity layers are as safe from overflow as the rest."""
    import comfy.ldm.modules.attention as comfy_attention

    import pva.method.patching

    dtypes = []
    fused = pva.method.patching.parallel_attention
    monkeypatch.setattr(
        pva.method.patching, "parallel_attention", lambda q, *rest: dtypes.append(q.dtype) or fused(q, *rest)
    )
    monkeypatch.setattr(
        comfy_attention,
        "FORCE_UPCAST_ATTENTION_DTYPE",
        {torch.float16: torch.float32} if forced_upcast else None,
    )
    model = tiny_model("sd15", seed=5)
    weights = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    layer = apply_identity(model, weights, identity_tokens(weights, 1)).get_model_object(
        f"diffusion_model.{weights.layers[0].name}"
    )
    layer.half()
    x, context = torch.randn(1, 64, 32).half(), torch.randn(1, 77, 768).half()
    out = layer(x, context=context, transformer_options={})
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert dtypes == [torch.float32 if forced_upcast else torch.float16]


def test_initializing_reads_the_checkpoints_weights_while_a_lora_clone_is_loaded():
    """After a KSampler ran a LoRA'd clone, the shared UNet holds LoRA-merged weights; a PVA
    model initialized from the plain MODEL must still copy the checkpoint's own W."""
    import comfy.model_management

    model = tiny_model("sd15", seed=6)
    before = PVAModel.initialize_from(model, num_tokens=2, encoder_depth=1)
    key = f"diffusion_model.{before.layers[0].name}.to_q.weight"
    lora = model.clone()
    lora.add_patches({key: ("diff", (torch.ones_like(model.model.state_dict()[key]),))}, 1.0)
    comfy.model_management.load_models_gpu([lora])
    try:
        live = model.model.state_dict()[key]
        assert not torch.equal(live, before.projections_for(before.layers[0].name).to_q.weight), (
            "LoRA not merged"
        )
        after = PVAModel.initialize_from(model, num_tokens=2, encoder_depth=1)
    finally:
        comfy.model_management.unload_all_models()
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))


def test_another_packs_attention_replacement_is_reported(caplog):
    """ComfyUI bypasses the attention module where an attn2 replace patch is set (IP-Adapter
    style), so PVA cannot act there: the user is told, not left guessing."""
    model = tiny_model("sd15")
    weights = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    apply_identity(model, weights, identity_tokens(weights, 1))
    assert "replaced by another node" not in caplog.text
    adapted = model.clone()
    adapted.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1)
    apply_identity(adapted, weights, identity_tokens(weights, 1))
    assert (
        "1 cross-attention layers of this MODEL are replaced by another node's attention patch" in caplog.text
    )
