"""ComfyUI's MMDiT internals that PVA reaches into: the joint-attention blocks of its Flux model
(comfy.ldm.flux: Flux.1, Flux Fill, Kontext, Flux.2) and its Qwen-Image model
(comfy.ldm.qwen_image), their modulation, QK-norms and RoPE, the attention override and the
diffusion-model wrapper of ComfyUI's patcher extensions. One adapter per family.

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


class _Flux:
    """comfy.ldm.flux's DoubleStreamBlock (Flux.1, Fill, Kontext, Flux.2): fused qkv per stream."""

    container = "double_blocks"

    def is_block(self, block: nn.Module) -> bool:
        return all(
            hasattr(block, a) for a in ("img_attn", "txt_attn", "img_norm1", "num_heads", "hidden_size")
        )

    def width(self, block: nn.Module) -> tuple[int, int]:
        return block.hidden_size, block.num_heads

    def projection_weights(self, block: nn.Module) -> dict[str, tuple[str, slice]]:
        hidden = block.hidden_size  # rows of the fused qkv weights [3 * hidden, hidden]
        return {
            "to_q": ("img_attn.qkv.weight", slice(0, hidden)),
            "to_k": ("txt_attn.qkv.weight", slice(hidden, 2 * hidden)),
            "to_v": ("txt_attn.qkv.weight", slice(2 * hidden, 3 * hidden)),
        }

    def image_input(self, block: nn.Module, img: torch.Tensor, vec) -> torch.Tensor:  # noqa: ANN001
        from comfy.ldm.flux.layers import apply_mod

        # the block's own modulation, or Flux.2's global one passed in `vec`
        modulation = block.img_mod(vec)[0] if block.modulation else vec[0][0]
        scale, shift = modulation.scale, modulation.shift
        if scale.dim() == 3 and scale.shape[1] > 1:
            # Flux.2's reference images at timestep zero (hosts after 0.3.75): one row per timestep,
            # the target's first (the reference tokens never see the identity, so its row serves all)
            scale, shift = scale[:, :1], shift[:, :1]
        return apply_mod(block.img_norm1(img), 1 + scale, shift, None)

    def norm_query(self, block: nn.Module, q: torch.Tensor) -> torch.Tensor:
        return block.img_attn.norm.query_norm(q)

    def norm_key(self, block: nn.Module, k: torch.Tensor) -> torch.Tensor:
        return block.txt_attn.norm.key_norm(k)

    def text_first(self, block: nn.Module) -> bool:
        return not getattr(block, "flipped_img_txt", False)


class _QwenImage:
    """comfy.ldm.qwen_image's QwenImageTransformerBlock: separate image and text projections."""

    container = "transformer_blocks"

    def is_block(self, block: nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return hasattr(block, "img_mod") and all(
            hasattr(attn, a) for a in ("to_q", "add_k_proj", "norm_added_k")
        )

    def width(self, block: nn.Module) -> tuple[int, int]:
        return block.attn.to_q.in_features, block.attn.heads

    def projection_weights(self, block: nn.Module) -> dict[str, tuple[str, slice]]:
        every = slice(None)
        return {"to_q": ("attn.to_q.weight", every), "to_k": ("attn.add_k_proj.weight", every), "to_v": ("attn.add_v_proj.weight", every)}  # fmt: skip

    def image_input(self, block: nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        first = block.img_mod(vec).chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(img), first)[0]

    def norm_query(self, block: nn.Module, q: torch.Tensor) -> torch.Tensor:
        return block.attn.norm_q(q)

    def norm_key(self, block: nn.Module, k: torch.Tensor) -> torch.Tensor:
        return block.attn.norm_added_k(k)

    def text_first(self, block: nn.Module) -> bool:
        return True


_FAMILIES = (_Flux(), _QwenImage())


def _family_of_model(diffusion_model: nn.Module) -> _Flux | _QwenImage | None:
    for family in _FAMILIES:
        blocks = getattr(diffusion_model, family.container, None)
        if (
            blocks is not None
            and hasattr(diffusion_model, "patch_size")
            and any(family.is_block(b) for b in blocks)
        ):
            return family
    return None


def _family(block: nn.Module) -> _Flux | _QwenImage:
    return next(f for f in _FAMILIES if f.is_block(block))


def joint_blocks(diffusion_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict name, block) of every joint-attention (double-stream) block, in order: Flux's
    double_blocks or Qwen-Image's transformer_blocks; [] for another architecture."""
    family = _family_of_model(diffusion_model)
    if family is None:
        return []
    blocks = getattr(diffusion_model, family.container)
    return [(f"{family.container}.{i}", b) for i, b in enumerate(blocks) if family.is_block(b)]


def transformer_blocks(diffusion_model: nn.Module) -> list[nn.Module]:
    """Every block of a DiT, in order (Flux: double- then single-stream): what gradient
    checkpointing recomputes."""
    joint = [block for _, block in joint_blocks(diffusion_model)]
    return [*joint, *getattr(diffusion_model, "single_blocks", ())]


def block_width(block: nn.Module) -> tuple[int, int]:
    """(hidden width, heads) of a block."""
    return _family(block).width(block)


def block_index(layer_name: str) -> int:
    return int(layer_name.rsplit(".", 1)[1])


def projection_weights(block: nn.Module) -> dict[str, tuple[str, slice]]:
    """Where W'q, W'k, W'v are initialised from: (parameter of the block, rows): the image
    stream's query weights and the text stream's key and value weights."""
    return _family(block).projection_weights(block)


def image_input(block: nn.Module, img: torch.Tensor, vec) -> torch.Tensor:  # noqa: ANN001
    """What the block's image query projection sees: its image tokens, layer-normed and modulated."""
    return _family(block).image_input(block, img, vec)


def norm_query(block: nn.Module, q: torch.Tensor) -> torch.Tensor:
    """The image stream's QK-norm on queries [B, H, L, D]."""
    return _family(block).norm_query(block, q)


def norm_key(block: nn.Module, k: torch.Tensor) -> torch.Tensor:
    """The text stream's QK-norm on keys [B, H, M, D] (identity tokens are keyed like text)."""
    return _family(block).norm_key(block, k)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE of the block's positions `pe` on [B, H, L, D]."""
    from comfy.ldm.flux.math import apply_rope1

    return apply_rope1(x, pe)


def text_first(block: nn.Module) -> bool:
    """Whether the joint sequence is [text; image] (Flux, Qwen-Image) rather than [image; text]."""
    return _family(block).text_first(block)


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
        # the forward's transformer_options (positional in Flux's and Qwen-Image's forward): the
        # dict that brought this wrapper
        options = next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "wrappers" in a), None
        )
        if options is not None:
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
    joint = joint_blocks(diffusion_model)
    if not joint:
        yield
        return
    hidden = block_width(joint[0][1])[0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.dim() == 3 and t.shape[-1] == hidden else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), host_training():
        yield


@contextmanager
def host_training() -> Iterator[None]:
    """ComfyUI's own training flag (comfy.model_management.in_training, as its LoRA trainer sets
    it) for the duration: hosts after 0.3.75 run Flux's RoPE through comfy_kitchen kernels, which
    have no autograd formula (nor float64), unless it is set. Older hosts have no flag."""
    import comfy.model_management as mm

    previous = getattr(mm, "in_training", None)
    if previous is None:
        yield
        return
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous
