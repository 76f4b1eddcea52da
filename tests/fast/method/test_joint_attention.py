"""Parallel visual attention on MMDiT joint attention: ComfyUI's own Flux, Flux Fill, Flux.2 and
Qwen-Image classes at a tiny width (random weights), through ModelPatcher and a real sampler."""

import comfy.sample
import pytest
import torch
from harness.models import (
    dit_conditioning,
    flux_inputs,
    identity_tokens,
    run_dit,
    tiny_flux,
    tiny_model,
    tiny_qwen_image,
)

from pva.errors import PVAError, PVAWeightsError
from pva.method import joint_patching
from pva.method.model import PVAModel
from pva.method.patching import apply_identity
from pva.method.weights import load_pva, read_metadata, save_pva

VARIANTS = ["flux", "flux-fill", "flux2", "qwen-image"]


def _dit(variant):
    return tiny_qwen_image() if variant == "qwen-image" else tiny_flux(variant)


@pytest.fixture(scope="module", params=VARIANTS)
def flux_setup(request):
    model = _dit(request.param)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    return request.param, model, pva


def _sample(model, seed=3, steps=3):
    config = model.model.model_config.unet_config
    # Qwen-Image's latents are video-style [B, C, T, H, W]
    shape = (
        (1, config["out_channels"], 1, 8, 8)
        if config["image_model"] == "qwen_image"
        else (1, config["out_channels"], 8, 8)
    )
    latent = torch.zeros(shape)
    positive = dit_conditioning(model)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, denoise=1.0, seed=seed
    )


def _own_weights(variant, block, hidden):
    """The block's image query, text key and text value weights, read off its own layout."""
    if variant == "qwen-image":
        return block.attn.to_q.weight, block.attn.add_k_proj.weight, block.attn.add_v_proj.weight
    img, txt = block.img_attn.qkv.weight, block.txt_attn.qkv.weight  # fused [q; k; v] rows
    return img[:hidden], txt[hidden : 2 * hidden], txt[2 * hidden :]


def test_initialized_from_the_blocks_image_query_and_text_key_value_weights(flux_setup):
    variant, model, pva = flux_setup
    hidden = 64
    container = "transformer_blocks" if variant == "qwen-image" else "double_blocks"
    assert [s.name for s in pva.layers] == [f"{container}.0", f"{container}.1"]
    assert pva.context_dim == hidden and all(s.kind == "joint_attention" for s in pva.layers)
    for spec in pva.layers:
        block = model.model.diffusion_model.get_submodule(spec.name)
        proj = pva.projections_for(spec.name)
        q, k, v = _own_weights(variant, block, hidden)
        assert torch.equal(proj.to_q.weight, q)
        assert torch.equal(proj.to_k.weight, k)
        assert torch.equal(proj.to_v.weight, v)


def test_strength_zero_and_inactive_identity_are_bit_exact_through_a_sampler(flux_setup):
    _, model, pva = flux_setup
    base = _sample(model)
    zero = apply_identity(model, pva, identity_tokens(pva, 1), strength=0.0)
    assert torch.equal(_sample(zero), base)
    negative_only = apply_identity(model, pva, identity_tokens(pva, 1), scope="negative")  # cfg 1: no uncond
    assert torch.equal(_sample(negative_only), base)
    # 3 euler steps sit at 0, 1/3 and 2/3 of the schedule: none inside [0.9, 1]
    late = apply_identity(model, pva, identity_tokens(pva, 1), start_percent=0.9, end_percent=1.0)
    assert torch.equal(_sample(late), base)
    # control: the same identity at strength 1 moves the sample well beyond float noise
    acting = _sample(apply_identity(model, pva, identity_tokens(pva, 1)))
    assert (acting - base).abs().mean() > 1e-3
    # the user's MODEL is untouched: no block replacement left behind, the same sample again
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert torch.equal(_sample(model), base)


def test_fused_joint_softmax_equals_the_written_out_reference(flux_setup, monkeypatch):
    """The whole model, with every block's widened attention computed by the fused call and by the
    formula written out (explicit score matrices per row block): the same, with a region mask
    and a strength; control: without the identity the output is far from both."""
    _, model, pva = flux_setup
    with torch.no_grad():  # make W' differ from W so that a mix-up would show
        for p in pva.projections.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    region = torch.zeros(1, 128, 128)
    region[:, :, :80] = 1.0
    patched = apply_identity(model, pva, identity_tokens(pva, 2), strength=0.7, region=region)
    inputs = flux_inputs(model, batch=2, size=16)
    fused = run_dit(patched, inputs)
    monkeypatch.setattr(joint_patching, "joint_attention", joint_patching.joint_attention_reference)
    reference = run_dit(patched, inputs)
    base = run_dit(model, inputs)
    assert (fused - reference).abs().max() <= 1e-5
    assert (fused - base).abs().max() > 1e3 * (fused - reference).abs().max()


def _first_block_image(patcher, inputs):
    """The image tokens leaving the first double-stream block (before any later block mixes them)."""
    captured = {}
    model = patcher.model.diffusion_model
    qwen = hasattr(model, "transformer_blocks")
    block = model.transformer_blocks[0] if qwen else model.double_blocks[0]

    def keep(module, args, out):  # Flux's blocks return (img, txt), Qwen-Image's (txt, img)
        captured.setdefault("img", out[1 if qwen else 0].clone())

    hook = block.register_forward_hook(keep)
    try:
        run_dit(patcher, inputs)
    finally:
        hook.remove()
    return captured["img"]


def test_a_region_masked_identity_acts_inside_its_region(flux_setup):
    """Left 5 of 8 token columns masked. In the first block the identity changes exactly the
    masked tokens; through the whole model (later blocks mix tokens) the change inside the
    region exceeds the change outside by a margin for each of three people, and the person's
    tokens move the result further than all-zero tokens do (which only take attention mass)."""
    variant, model, pva = flux_setup
    inputs = flux_inputs(model, batch=1, size=16)
    grid = 16 if variant == "flux2" else 8  # token grid of a 16x16 latent: 1x1 (Flux.2) or 2x2 patches
    region = torch.zeros(1, 128, 128)
    region[:, :, :80] = 1.0  # 5/8 of the width: latent columns 0-9
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    inside[:, : grid * 5 // 8] = True
    inside = inside.flatten()

    base_block = _first_block_image(model, inputs)[0]
    person = _first_block_image(apply_identity(model, pva, identity_tokens(pva, 1), region=region), inputs)[0]
    change = (person - base_block).abs().amax(dim=-1)
    assert change[~inside].max() <= 1e-5, "outside the region the first block is the base block"
    assert change[inside].min() > 1e-4

    base = run_dit(model, inputs)[0]
    zero = run_dit(
        apply_identity(model, pva, torch.zeros_like(identity_tokens(pva, 1)), region=region), inputs
    )[0]
    left = slice(0, 10)
    for seed in (1, 2, 3):
        out = run_dit(apply_identity(model, pva, identity_tokens(pva, seed), region=region), inputs)[0]
        delta = (out - base).abs()
        inside_change, outside_change = delta[..., left].mean(), delta[..., 10:].mean()
        assert inside_change > 3 * outside_change, (seed, inside_change, outside_change)
        assert (out - zero).abs()[..., left].mean() > 2 * (zero - base).abs()[..., 10:].mean()


def test_models_of_another_architecture_or_width_are_refused():
    flux, sd15 = tiny_flux("flux"), tiny_model("sd15")
    flux_pva = PVAModel.initialize_from(flux, num_tokens=4, encoder_depth=1)
    unet_pva = PVAModel.initialize_from(sd15, num_tokens=4, encoder_depth=1)
    with pytest.raises(
        PVAError, match=r"made for SD1.x .*UNet with cross-attention; the MODEL is Flux, a DiT"
    ):
        apply_identity(flux, unet_pva, identity_tokens(unet_pva, 1))
    with pytest.raises(
        PVAError, match=r"made for Flux \(2 double-stream blocks, 64-d tokens\).*the MODEL is SD15"
    ):
        apply_identity(sd15, flux_pva, identity_tokens(flux_pva, 1))
    with pytest.raises(PVAError, match=r"tokens of shape \(1, 4, 768\) do not fit Flux"):
        apply_identity(flux, flux_pva, torch.zeros(1, 4, 768))
    wider = tiny_flux("flux", hidden_size=96, num_heads=3)
    with pytest.raises(PVAError, match=r"made for Flux \(2 double-stream blocks, 64-d tokens\).*96-d"):
        apply_identity(wider, flux_pva, identity_tokens(flux_pva, 1))


def test_flux_pva_file_round_trips_and_records_its_architecture(tmp_path):
    model = tiny_flux("flux2")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    path = save_pva(pva, tmp_path / "flux2.safetensors")
    metadata = read_metadata(path)
    assert metadata["format_version"] == "3" and metadata["family"] == "Flux2"
    assert '"kind": "joint_attention"' in metadata["layers"]
    loaded = load_pva(path)
    assert loaded.layers == pva.layers
    inputs = flux_inputs(model, batch=1)
    tokens = identity_tokens(pva, 1)
    assert torch.equal(
        run_dit(apply_identity(model, loaded, tokens), inputs),
        run_dit(apply_identity(model, pva, tokens), inputs),
    )
    # an older pack's reader (format 2) refuses it instead of misreading it
    from pva.method import weights

    weights.FORMAT_VERSION, saved = 2, weights.FORMAT_VERSION
    try:
        with pytest.raises(PVAWeightsError, match="format version 3; this pack reads up to 2"):
            load_pva(path)
    finally:
        weights.FORMAT_VERSION = saved


@pytest.mark.parametrize("variant", ["flux", "flux2", "qwen-image"])
def test_at_initialization_the_parallel_query_is_the_blocks_own_image_query(variant, monkeypatch):
    """W'q starts as the block's image query weights, so (without the qkv bias, which W' does
    not copy) q' must be exactly the query the block itself computes for each image token:
    same modulation (Flux.2: the model's global one), QK-norm and rotation. Control: the text
    rows' queries are another thing."""
    model = _dit(variant)
    for name, parameter in model.model.diffusion_model.named_parameters():
        if name.endswith(("img_attn.qkv.bias", "attn.to_q.bias")):
            parameter.data.zero_()
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    seen = []
    fused = joint_patching.joint_attention

    def spy(q, k, v, visual, rows):
        seen.append((q.transpose(1, 2).flatten(2), visual[0].query, rows))  # [B, N, H*D] like the query
        return fused(q, k, v, visual, rows)

    monkeypatch.setattr(joint_patching, "joint_attention", spy)
    run_dit(apply_identity(model, pva, identity_tokens(pva, 1)), flux_inputs(model, batch=2))
    assert len(seen) == 2  # one widened attention call per double-stream block
    for q, parallel, rows in seen:
        assert rows.start == 12 and rows.stop == q.shape[1]  # [12 text tokens; image tokens]
        assert (parallel - q[:, rows]).abs().max() <= 1e-5
        assert (parallel[:, :12] - q[:, :12]).abs().max() > 0.1


def test_kontext_reference_tokens_never_see_the_identity():
    """Flux Kontext appends a reference image's tokens after the target's: in the first block the
    identity changes the target's tokens and leaves the reference's exactly as they were."""
    model = tiny_flux("flux")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    inputs = flux_inputs(model, batch=1, size=16)
    inputs["ref_latents"] = [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))]
    base = _first_block_image(model, inputs)[0]
    person = _first_block_image(apply_identity(model, pva, identity_tokens(pva, 1)), inputs)[0]
    assert base.shape[0] == 64 + 16  # 8x8 target tokens, then 4x4 reference tokens
    change = (person - base).abs().amax(dim=-1)
    assert change[:64].min() > 1e-4
    assert change[64:].max() <= 1e-5


def test_flux2_reference_images_at_timestep_zero_keep_the_targets_own_parallel_query(monkeypatch):
    """Flux.2's "index_timestep_zero" reference method (hosts after 0.3.75) modulates the target
    image's tokens with the sampled timestep and the reference image's with t = 0 (one modulation
    row each): the target tokens' parallel query is still the block's own image query, and the
    reference tokens never see the identity. (On older hosts the method is unknown and the
    references are placed by offset: the same holds.)"""
    model = tiny_flux("flux2")
    pva = PVAModel.initialize_from(model, num_tokens=4, encoder_depth=1)
    seen = []
    fused = joint_patching.joint_attention

    def spy(q, k, v, visual, rows):
        seen.append((q.transpose(1, 2).flatten(2), visual[0].query, visual[0].bias, rows))
        return fused(q, k, v, visual, rows)

    monkeypatch.setattr(joint_patching, "joint_attention", spy)
    inputs = flux_inputs(model, batch=1, size=16)
    reference = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(5))
    inputs.update(ref_latents=[reference], ref_latents_method="index_timestep_zero")
    out = run_dit(apply_identity(model, pva, identity_tokens(pva, 1)), inputs)
    assert torch.isfinite(out).all() and len(seen) == 2
    target = 16 * 16  # Flux.2: 1x1 patches of the 16x16 latent, then the 8x8 reference's 64 tokens
    for q, parallel, bias, rows in seen:
        assert rows.stop - rows.start == target + 64
        assert (parallel[:, :target] - q[:, rows][:, :target]).abs().max() <= 1e-5
        assert bias is not None and torch.isinf(bias[:, :, target:]).all()


@pytest.mark.parametrize("scope, acting_row", [("positive", 1), ("negative", 0)])
def test_apply_to_acts_only_on_its_cfg_branch(flux_setup, scope, acting_row):
    """A CFG batch [uncond, cond] (cond_or_uncond [1, 0]): the identity changes only the rows of
    the branch it applies to; the other rows are the base model's (to float rounding)."""
    _, model, pva = flux_setup
    inputs = flux_inputs(model, batch=2)
    options = {"cond_or_uncond": [1, 0]}
    base = run_dit(model, inputs, options)
    out = run_dit(apply_identity(model, pva, identity_tokens(pva, 1), scope=scope), inputs, options)
    change = (out - base).flatten(1).abs().amax(dim=1)
    assert change[1 - acting_row] <= 1e-5 and change[acting_row] > 1e-3, change
