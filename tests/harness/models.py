"""Small UNets of the real SD1.x / SD2.x / SDXL architectures (ComfyUI's own classes), random weights.

Channel counts are tiny so tests run in seconds on 2 cores; context widths, attention layout,
linear-vs-conv projections, attention precision and ADM inputs are the families' own."""

import torch

# comfy.model_detection's SD15 UNet config, with the inpainting model's 9 input channels
# (4 noisy latent + 1 mask + 4 masked-image latent).
SD15_INPAINT_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 9, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
# Two levels of one res block each: comfy.model_detection still finds SD15 (in_channels 9).
SD15_INPAINT_UNET_SMALL = dict(
    SD15_INPAINT_UNET, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
)  # fmt: skip

# comfy.sd.VAE's default SD1.x/SD2.x VAE.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


def _unet_config(family: str, in_channels: int) -> dict:
    common = dict(
        image_size=32, in_channels=in_channels, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1], use_spatial_transformer=True, legacy=False,
        use_temporal_attention=False, use_temporal_resblock=False, adm_in_channels=None,
    )  # fmt: skip
    if family == "sd15":
        return dict(common, context_dim=768, use_linear_in_transformer=False)
    if family in ("sd20", "sd20v"):
        return dict(common, context_dim=1024, use_linear_in_transformer=True)
    if family == "sdxl":
        return dict(
            common, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
            num_classes="sequential", transformer_depth=[1, 2], transformer_depth_output=[1, 1, 1, 2, 2, 2],
        )  # fmt: skip
    raise ValueError(family)


def fill_random(module: torch.nn.Module, seed: int) -> None:
    """Sensible random weights (ComfyUI's disable_weight_init ops leave them uninitialized):
    norm scales ~1, biases ~0, other weights ~N(0, 1/fan_in), all from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("bias"):
                param.copy_(noise * 0.02)
            elif param.dim() <= 1:  # norm scales (and scalars such as a logit scale)
                param.copy_(1.0 + noise * 0.02)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def tiny_model(family: str = "sd15", in_channels: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a ComfyUI BaseModel of the given family, on CPU, in `dtype`."""
    import comfy.model_base
    import comfy.supported_models as sm

    config_class = {"sd15": sm.SD15, "sd20": sm.SD20, "sd20v": sm.SD20, "sdxl": sm.SDXL}[family]
    config = config_class(_unet_config(family, in_channels))
    config.unet_config["num_head_channels"] = 16  # the families' 64-d heads, scaled to 32 channels
    config.unet_config["num_heads"] = -1
    config.set_inference_dtype(dtype, None)
    model_type = (
        comfy.model_base.ModelType.V_PREDICTION if family == "sd20v" else comfy.model_base.ModelType.EPS
    )
    model_class = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = model_class(config, model_type=model_type, device=torch.device("cpu"))
    if config.inpaint_model():
        model.set_inpaint()
    return _on_cpu(model, seed)


def _on_cpu(model, seed: int):
    """A ModelPatcher on the CPU around `model`, its diffusion model filled with random weights."""
    import comfy.model_patcher

    fill_random(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def unet_inputs(patcher, batch: int = 2, size: int = 16, seed: int = 1, tokens: int = 77) -> dict:
    """Deterministic x / timesteps / context (/ y for SDXL) for a direct UNet call."""
    generator = torch.Generator().manual_seed(seed)
    unet = patcher.model.diffusion_model
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    inputs = dict(
        x=torch.randn(batch, unet.in_channels, size, size, generator=generator),
        timesteps=torch.tensor([500.0, 700.0][:batch] + [600.0] * max(0, batch - 2)),
        context=torch.randn(batch, tokens, context_dim, generator=generator),
    )
    adm_channels = patcher.model.model_config.unet_config.get("adm_in_channels")
    if adm_channels:  # SDXL's pooled-text + size conditioning (ADM)
        inputs["y"] = torch.randn(batch, adm_channels, generator=generator)
    return inputs


def run_unet(patcher, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    """Patch the model (object patches included), run the UNet once, unpatch."""
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(
                **inputs, transformer_options=dict(transformer_options or {})
            )
    finally:
        patcher.unpatch_model()


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A ComfyUI VAE (AutoencoderKL, 8x down-sampling like SD's) with few channels, random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(
        double_z=True, z_channels=latent_channels, resolution=256, in_channels=3, out_ch=3, ch=32,
        ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    )  # fmt: skip
    params = dict(embed_dim=latent_channels, ddconfig=ddconfig)
    autoencoder = AutoencoderKL(**params)
    fill_random(autoencoder, seed)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params})
    vae.latent_channels = latent_channels
    return vae


def text_conditioning(patcher, seed: int = 7, tokens: int = 77) -> list:
    """A CONDITIONING like CLIPTextEncode's, random, of the model's context width (with the
    pooled text embedding SDXL's ADM input is made from)."""
    generator = torch.Generator().manual_seed(seed)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    extra = {}
    if patcher.model.model_config.unet_config.get("adm_in_channels"):
        extra["pooled_output"] = torch.randn(1, 1280, generator=generator)
    return [[torch.randn(1, tokens, context_dim, generator=generator), extra]]


def dit_conditioning(patcher, seed: int = 7, tokens: int = 12) -> list:
    """A CONDITIONING like a DiT's text encoders give, random: Flux's T5 context with its pooled
    CLIP text (none for Flux.2) and the guidance FluxGuidance sets; Qwen-Image's context alone."""
    generator = torch.Generator().manual_seed(seed)
    config = patcher.model.model_config.unet_config
    if config["image_model"] == "qwen_image":
        return [[torch.randn(1, tokens, config["joint_attention_dim"], generator=generator), {}]]
    extra = {"guidance": 3.5, "pooled_output": None}
    if config.get("vec_in_dim"):
        extra["pooled_output"] = torch.randn(1, config["vec_in_dim"], generator=generator)
    return [[torch.randn(1, tokens, config["context_in_dim"], generator=generator), extra]]


def identity_tokens(pva, seed: int) -> torch.Tensor:
    """The PVA model's identity tokens of three random (unit) face embeddings."""
    generator = torch.Generator().manual_seed(seed)
    return pva.encode(torch.nn.functional.normalize(torch.randn(3, 512, generator=generator), dim=-1))


# comfy.model_detection's Flux / Flux.2 configs at a tiny width: 2 heads of 32 channels (RoPE axes
# summing to 32), 2 double-stream and 1 single-stream block; text 32-d, pooled text 32-d.
_FLUX_COMMON = dict(
    patch_size=2, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=1, context_in_dim=32,
)  # fmt: skip
FLUX_VARIANTS = {
    "flux": dict(
        _FLUX_COMMON, image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, mlp_ratio=4.0,
        axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True,
    ),
    # Flux.1 Fill: 16 noisy + 16 masked-image latent channels + the 8x8 mask packed into 64
    "flux-fill": dict(
        _FLUX_COMMON, image_model="flux", in_channels=96, out_channels=16, vec_in_dim=32, mlp_ratio=4.0,
        axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True,
    ),
    "flux2": dict(
        _FLUX_COMMON, image_model="flux2", in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None,
        mlp_ratio=3.0, axes_dim=[8, 8, 8, 8], theta=2000, qkv_bias=False, guidance_embed=True,
        global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
    ),
}  # fmt: skip


# comfy.model_detection's Qwen-Image config at a tiny width: 2 heads of 32 channels, 2 blocks.
QWEN_IMAGE = dict(
    image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
)  # fmt: skip


def tiny_qwen_image(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around ComfyUI's QwenImage BaseModel at a tiny width, on CPU."""
    import comfy.supported_models as sm

    config = sm.QwenImage(dict(QWEN_IMAGE))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    return _on_cpu(model, seed)


def _host_flux_params(variant: str) -> dict:
    """Config keys only newer hosts' FluxParams have (and require): comfy.model_detection's
    txt_ids_dims (hosts after 0.3.75: Flux.2 numbers its text tokens on RoPE axis 3, Flux.1 on none)."""
    from comfy.ldm.flux.model import FluxParams

    if "txt_ids_dims" not in FluxParams.__dataclass_fields__:
        return {}
    return {"txt_ids_dims": [3] if variant == "flux2" else []}


def tiny_flux(variant: str = "flux", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A ModelPatcher around ComfyUI's Flux / Flux Fill / Flux.2 BaseModel at a tiny width, on CPU
    (`overrides`: other config values, e.g. hidden_size and num_heads)."""
    import comfy.supported_models as sm

    config_class = {"flux": sm.Flux, "flux-fill": sm.FluxInpaint, "flux2": sm.Flux2}[variant]
    config = config_class(dict(FLUX_VARIANTS[variant], **_host_flux_params(variant), **overrides))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    return _on_cpu(model, seed)


def flux_inputs(patcher, batch: int = 2, size: int = 16, seed: int = 1, tokens: int = 12) -> dict:
    """Deterministic latent x / timesteps / text context / pooled text / guidance for a direct call."""
    generator = torch.Generator().manual_seed(seed)
    config = patcher.model.model_config.unet_config
    timestep = torch.tensor([0.5, 0.8][:batch] + [0.6] * max(0, batch - 2))
    if config["image_model"] == "qwen_image":  # latents [B, 16, 1, H, W], text of joint_attention_dim
        return dict(
            x=torch.randn(batch, config["out_channels"], 1, size, size, generator=generator),
            timestep=timestep,
            context=torch.randn(batch, tokens, config["joint_attention_dim"], generator=generator),
        )
    inputs = dict(
        x=torch.randn(batch, config["in_channels"], size, size, generator=generator),
        timestep=timestep,
        context=torch.randn(batch, tokens, config["context_in_dim"], generator=generator),
        guidance=torch.full((batch,), 3.5),
    )
    if config.get("vec_in_dim"):
        inputs["y"] = torch.randn(batch, config["vec_in_dim"], generator=generator)
    return inputs


def run_dit(patcher, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    """Patch the model, run the diffusion model once as ComfyUI's sampler would (the patcher's
    transformer_options and wrappers), unpatch."""
    import comfy.patcher_extension

    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    options.update(transformer_options or {})
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(**inputs, transformer_options=options)
    finally:
        patcher.unpatch_model()
