"""Model management beyond its loading calls: wrapping a module as a ModelPatcher, and taking one
patcher (a training clone) out of the loaded models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher


def patcher_for(module: torch.nn.Module) -> ModelPatcher:
    """`module` behind a ModelPatcher on ComfyUI's devices (as core's CLIP vision model is), so
    model management counts its memory and moves it."""
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        module,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def is_loaded(patcher: ModelPatcher) -> bool:
    import comfy.model_management

    return any(loaded.model is patcher for loaded in comfy.model_management.current_loaded_models)


def unload(patcher: ModelPatcher) -> None:
    """Take `patcher` out of ComfyUI's loaded models, restoring the original modules (what
    free_memory does for the models it evicts)."""
    import comfy.model_management

    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model is patcher:
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)
            return
    patcher.unpatch_model()  # patched but never registered (loading failed half-way)
