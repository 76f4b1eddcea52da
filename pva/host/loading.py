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

    return any(model is patcher for model in comfy.model_management.loaded_models())


def unload(patcher: ModelPatcher) -> None:
    """Take `patcher` out of ComfyUI's loaded models, restoring the original modules, through the
    call core's own unload_model_and_clones uses (free_memory keeping every other model): the
    list of loaded models is only read here, so each patcher class (0.33's dynamic one too)
    unloads its own way."""
    import comfy.model_management

    others = [
        loaded for loaded in comfy.model_management.current_loaded_models if loaded.model is not patcher
    ]
    if len(others) == len(comfy.model_management.current_loaded_models):
        patcher.unpatch_model()  # patched but never registered (loading failed half-way)
        return
    comfy.model_management.free_memory(1e30, patcher.load_device, keep_loaded=others)
