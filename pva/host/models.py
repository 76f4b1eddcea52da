"""What a loaded MODEL is: its family and prediction type, its attention precision policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher


def family(model_patcher: ModelPatcher) -> str:
    """ComfyUI's name for the model family (its supported_models class), e.g. SD15, SDXL."""
    return type(model_patcher.model.model_config).__name__


def is_v_prediction(model_patcher: ModelPatcher) -> bool:
    from comfy.model_base import ModelType

    return model_patcher.model.model_type == ModelType.V_PREDICTION


def attention_precision(layer_precision: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """ComfyUI's policy for an attention layer: its own precision, --dont-upcast-attention, and
    the forced fp32 upcast of fp16 attention on some platforms."""
    from comfy.ldm.modules.attention import get_attn_precision

    return get_attn_precision(layer_precision, dtype)


def is_inpainting_model(model_patcher: ModelPatcher) -> bool:
    """Whether the MODEL takes the masked image and mask as extra input channels (SD inpainting,
    Flux Fill): more input channels than it predicts."""
    config = model_patcher.model.model_config.unet_config
    return config.get("in_channels", 4) > config.get("out_channels", 4)


def has_image_latents(model_patcher: ModelPatcher) -> bool:
    """Whether the MODEL works on [B, C, H, W] image latents (not a video-style [B, C, T, H, W]
    latent, as Qwen-Image's Wan VAE gives)."""
    return model_patcher.model.latent_format.latent_dimensions == 2
