"""A PVA model: the identity encoder plus W'q/W'k/W'v for every layer identity attaches to
(a UNet's cross-attention layers, an MMDiT's double-stream blocks)."""

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import PVAError
from .encoder import IdentityEncoder
from .layers import JOINT, LayerSpec, family_label, require_layers
from .person_token import PersonToken

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

# What a training run may update: the identity encoder, the parallel projections, or both.
TRAINABLE = ("both", "identity_encoder", "projections")


class ParallelProjections(nn.Module):
    """W'q, W'k, W'v of one layer (no bias, like the layer's own Wq, Wk, Wv)."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.to_q = nn.Linear(spec.query_dim, spec.inner_dim, bias=False)
        self.to_k = nn.Linear(spec.context_dim, spec.inner_dim, bias=False)
        self.to_v = nn.Linear(spec.context_dim, spec.inner_dim, bias=False)


def _module_key(layer_name: str) -> str:
    # nn.ModuleDict keys cannot contain dots; file keys keep ComfyUI's dotted names.
    return layer_name.replace(".", "__")


class PVAModel(nn.Module):
    """Everything PVA adds to a frozen UNet. Lives in float32 on the CPU until used; the
    attention patch casts what it needs to the hidden states' device and dtype."""

    def __init__(
        self, layers: list[LayerSpec], encoder: IdentityEncoder, family: str, provenance: dict | None = None
    ):
        super().__init__()
        if not layers:
            raise PVAError("model: it has no cross-attention layers, so PVA cannot be applied to it.")
        self.layers = list(layers)
        self.family = family
        self.provenance = dict(provenance or {})
        self.identity_encoder = encoder
        self.projections = nn.ModuleDict({_module_key(s.name): ParallelProjections(s) for s in layers})
        self.person_token: PersonToken | None = None  # learned by the from-scratch recipe

    @property
    def is_pretrained(self) -> bool:
        """Whether its encoder and projections were trained on many people (scripts/pretrain.py)."""
        return "pretrained" in self.provenance

    @property
    def context_dim(self) -> int:
        return self.identity_encoder.config["context_dim"]

    @property
    def num_tokens(self) -> int:
        return self.identity_encoder.num_tokens

    def describe(self) -> str:
        token = f", person token {self.person_token.describe()}" if self.person_token is not None else ""
        if self.layers[0].kind == JOINT:
            return (
                f"{self.family} ({len(self.layers)} double-stream blocks, {self.context_dim}-d tokens{token})"
            )
        return f"{family_label(self.context_dim)} ({self.family}, {self.context_dim}-d context{token})"

    def projections_for(self, layer_name: str) -> ParallelProjections:
        return self.projections[_module_key(layer_name)]

    @torch.no_grad()
    def encode(self, face_embeddings: torch.Tensor) -> torch.Tensor:
        """[N, 512] face embeddings -> [1, M, context_dim] identity tokens (inference mode)."""
        was_training = self.identity_encoder.training
        self.identity_encoder.eval()
        try:
            return self.identity_encoder(face_embeddings.float().cpu())
        finally:
            self.identity_encoder.train(was_training)

    @classmethod
    def initialize_from(
        cls,
        model_patcher: "ModelPatcher",
        num_tokens: int = 10,
        seed: int = 0,
        encoder_depth: int = 4,
        encoder_heads: int = 8,
    ) -> "PVAModel":
        """A fresh PVA model for a loaded MODEL: W' copied from each layer's W, encoder seeded.

        Uses the checkpoint's own weights (LoRA weight patches are not folded in), also while
        ComfyUI has a patched clone of the same model loaded."""
        diffusion_model = model_patcher.model.diffusion_model
        layers = require_layers(model_patcher)
        context_dim = layers[0].context_dim
        family = type(model_patcher.model.model_config).__name__
        modules = dict(diffusion_model.named_modules())
        # Normal (not inference) tensors even inside ComfyUI's executor: they may be trained later.
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = IdentityEncoder(context_dim, num_tokens, depth=encoder_depth, heads=encoder_heads)
            pva = cls(layers, encoder, family, provenance={"initialized_from": family, "seed": seed})
            with torch.no_grad():
                for spec in layers:
                    source, target = modules[spec.name], pva.projections_for(spec.name)
                    for proj, (weight_name, rows) in _initial_weights(spec, source).items():
                        weight = _base_weight(model_patcher, spec.name, weight_name, source)
                        getattr(target, proj).weight.copy_(weight[rows].detach().to("cpu", torch.float32))
        return pva


def _initial_weights(spec: LayerSpec, module: nn.Module) -> dict[str, tuple[str, slice]]:
    """Which of the layer's own weights (and which rows of them) each W' starts as."""
    if spec.kind == JOINT:
        from ..host.mmdit import projection_weights

        return projection_weights(module)
    return {proj: (f"{proj}.weight", slice(None)) for proj in ("to_q", "to_k", "to_v")}


def _base_weight(model_patcher: "ModelPatcher", layer: str, weight: str, module: nn.Module) -> torch.Tensor:
    """The unpatched weight: while a clone with weight patches (a LoRA) is loaded, the live
    tensor holds the patched values and ComfyUI keeps the original in the shared backup."""
    backup = getattr(model_patcher, "backup", {}).get(f"diffusion_model.{layer}.{weight}")
    return backup.weight if backup is not None else module.get_parameter(weight)
