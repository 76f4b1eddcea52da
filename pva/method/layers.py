"""Where identity attaches in a ComfyUI MODEL, and the shapes of the parallel projections there.

Two kinds of attachment site, one per model architecture:
- "cross_attention": a UNet's (SD1.x/2.x/XL) text cross-attention `attn2` (patching.py);
- "joint_attention": an MMDiT double-stream block (Flux, Flux Fill/Kontext, Flux.2, Qwen-Image),
  whose text and image tokens share one softmax (joint_patching.py).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..errors import PVAError

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

FAMILY_BY_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def family_label(context_dim: int) -> str:
    return FAMILY_BY_CONTEXT.get(context_dim, f"a {context_dim}-d context model")


def native_resolution(model_patcher: "ModelPatcher") -> int:
    """The image side the MODEL's family was trained at: SD1.x 512, SD2.x 512 (768 for the
    v-prediction models), SDXL and anything newer 1024."""
    from ..host.models import is_v_prediction

    context_dim = model_patcher.model.model_config.unet_config.get("context_dim")
    if context_dim == 768:
        return 512
    if context_dim == 1024:
        return 768 if is_v_prediction(model_patcher) else 512
    return 1024


JOINT = "joint_attention"


@dataclass(frozen=True)
class LayerSpec:
    """One cross-attention layer, named as in ComfyUI's diffusion_model state dict."""

    name: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    query_dim: int
    context_dim: int
    inner_dim: int
    heads: int
    kind: str = "cross_attention"  # or JOINT

    def to_json(self) -> dict:
        return dict(self.__dict__)


def is_cross_attention(module: nn.Module) -> bool:
    """A ComfyUI CrossAttention (or our stand-in for one) that attends to a text context."""
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")) and hasattr(
        module.to_k, "in_features"
    )


def find_layers(diffusion_model: nn.Module) -> list[LayerSpec]:
    """Every site of this MODEL where identity attaches: its cross-attention layers (a UNet) or
    its double-stream blocks (an MMDiT); empty for a model with neither."""
    from ..host.mmdit import block_width, joint_blocks

    joint = [(name, *block_width(block)) for name, block in joint_blocks(diffusion_model)]
    if joint:
        return [LayerSpec(name, width, width, width, heads, JOINT) for name, width, heads in joint]
    return find_cross_attention_layers(diffusion_model)


def require_layers(model_patcher: "ModelPatcher") -> list[LayerSpec]:
    """find_layers of the MODEL, or an error that says why PVA has nothing to attach to."""
    layers = find_layers(model_patcher.model.diffusion_model)
    if not layers:
        raise PVAError(
            f"model: this MODEL ({type(model_patcher.model.model_config).__name__}) has neither cross-attention "
            "layers (SD1.x/2.x/XL) nor double-stream blocks (Flux, Flux.2, Qwen-Image), so there is nothing "
            "for parallel visual attention to attach to."
        )
    return layers


def find_cross_attention_layers(diffusion_model: nn.Module) -> list[LayerSpec]:
    """Every `attn2` whose keys come from the text context (self-attention attn1 excluded)."""
    specs = []
    for name, module in diffusion_model.named_modules():
        if not name.endswith("attn2") or not is_cross_attention(module):
            continue
        specs.append(
            LayerSpec(
                name=name,
                query_dim=module.to_q.in_features,
                context_dim=module.to_k.in_features,
                inner_dim=module.to_q.out_features,
                heads=module.heads,
            )
        )
    return specs
