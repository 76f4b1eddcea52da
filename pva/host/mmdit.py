"""ComfyUI's MMDiT internals that PVA reaches into: the double-stream blocks of its Flux model
(comfy.ldm.flux: Flux.1, Flux Fill, Kontext, Flux.2), their modulation, QK-norms and RoPE, the
attention override and the diffusion-model wrapper of ComfyUI's patcher extensions.

A block is reached through ModelPatcher's `dit` block replacement (("double_block", i)); inside
the host's own block, its one attention call goes through `optimized_attention_override`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

GRID_KEY = "pva_image_grid"  # transformer_options: (h, w) of the target image's token grid
_GRID_WRAPPER = "pva_image_grid"


def joint_blocks(diffusion_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict name, block) of every Flux-style double-stream block, in order; [] for
    another architecture."""
    blocks = getattr(diffusion_model, "double_blocks", None)
    if blocks is None or not hasattr(diffusion_model, "patch_size"):
        return []
    return [(f"double_blocks.{i}", b) for i, b in enumerate(blocks) if _is_double_stream(b)]


def _is_double_stream(block: nn.Module) -> bool:
    return all(hasattr(block, a) for a in ("img_attn", "txt_attn", "img_norm1", "num_heads", "hidden_size"))


def block_index(layer_name: str) -> int:
    return int(layer_name.rsplit(".", 1)[1])


def projection_weights(block: nn.Module) -> dict[str, tuple[str, slice]]:
    """Where W'q, W'k, W'v are initialised from: the image stream's query rows and the text
    stream's key and value rows of the fused qkv weights ([3 * hidden, hidden])."""
    hidden = block.hidden_size
    return {
        "to_q": ("img_attn.qkv.weight", slice(0, hidden)),
        "to_k": ("txt_attn.qkv.weight", slice(hidden, 2 * hidden)),
        "to_v": ("txt_attn.qkv.weight", slice(2 * hidden, 3 * hidden)),
    }


def image_input(block: nn.Module, img: torch.Tensor, vec) -> torch.Tensor:  # noqa: ANN001
    """What the block's image qkv projection sees: its image tokens, layer-normed and modulated
    (the block's own modulation, or Flux.2's global one passed in `vec`)."""
    from comfy.ldm.flux.layers import apply_mod

    modulation = block.img_mod(vec)[0] if block.modulation else vec[0][0]
    return apply_mod(block.img_norm1(img), 1 + modulation.scale, modulation.shift, None)


def norm_query(block: nn.Module, q: torch.Tensor) -> torch.Tensor:
    """The image stream's QK-norm on queries [B, H, L, D]."""
    return block.img_attn.norm.query_norm(q)


def norm_key(block: nn.Module, k: torch.Tensor) -> torch.Tensor:
    """The text stream's QK-norm on keys [B, H, M, D] (identity tokens are keyed like text)."""
    return block.txt_attn.norm.key_norm(k)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE of the block's positions `pe` on [B, H, L, D]."""
    from comfy.ldm.flux.math import apply_rope1

    return apply_rope1(x, pe)


def text_first(block: nn.Module) -> bool:
    """Whether the joint sequence is [text; image] (Flux) rather than [image; text]."""
    return not getattr(block, "flipped_img_txt", False)


def plain(t):  # noqa: ANN001, ANN201
    """A tensor as given to the attention override (newer hosts wrap q, k, v in a container)."""
    return t if isinstance(t, torch.Tensor) else t.take()


def set_block_replacement(patched: ModelPatcher, layer_name: str, replacement: Callable) -> None:
    patched.set_model_patch_replace(replacement, "dit", "double_block", block_index(layer_name))


def block_replacement(model_patcher: ModelPatcher, layer_name: str) -> Callable | None:
    options = model_patcher.model_options.get("transformer_options", {})
    return options.get("patches_replace", {}).get("dit", {}).get(("double_block", block_index(layer_name)))


def record_image_grid(patched: ModelPatcher) -> None:
    """Make every forward pass put (h, w), the target image's token grid, into its
    transformer_options under GRID_KEY: a region mask needs it, and Flux does not record it."""
    from comfy.patcher_extension import WrappersMP

    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, _GRID_WRAPPER)
    patch_size = patched.model.diffusion_model.patch_size
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, _GRID_WRAPPER, _GridRecorder(patch_size))


class _GridRecorder:
    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, executor, x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        # Flux's forward(x, timestep, context, y, guidance, ref_latents, control, transformer_options)
        options = kwargs.get("transformer_options", args[6] if len(args) > 6 else None)
        if isinstance(options, dict):
            p = self.patch_size
            options[GRID_KEY] = ((x.shape[-2] + p // 2) // p, (x.shape[-1] + p // 2) // p)
        return executor(x, *args, **kwargs)


@contextmanager
def differentiable_residuals(diffusion_model: nn.Module) -> Iterator[None]:
    """Make a backward pass through ComfyUI's Flux possible (training).

    Its blocks add to their residual streams in place (`x += ...`) after their LayerNorm saved x
    for the backward pass, and autograd then refuses to differentiate. Within this context every
    tensor autograd saves that has a residual stream's shape ([B, L, hidden]) is saved as a copy,
    which the in-place update does not reach. Nothing changes for other models."""
    if not joint_blocks(diffusion_model):
        yield
        return
    hidden = diffusion_model.hidden_size

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.dim() == 3 and t.shape[-1] == hidden else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
