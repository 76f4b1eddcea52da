"""Apply parallel visual attention to a ComfyUI MODEL through its ModelPatcher.

An identity (IdentityStream) attaches where the model's layers say (layers.py). In a UNet every
cross-attention module `attn2` is replaced, in a clone of the ModelPatcher, by a
ParallelCrossAttention that shares the original's projections (object patches); in an MMDiT each
double-stream block gets a block replacement (joint_patching.py). The user's MODEL is never
mutated: ComfyUI puts the original modules back when the clone is unpatched.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PVAError
from ..host.models import attention_precision
from .attention import VisualKeys, parallel_attention
from .joint_patching import attach_joint
from .layers import JOINT, family_label, require_layers

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

# Which CFG branches an identity acts on. ComfyUI's cond_or_uncond marks each chunk of a batch:
# 0 = the positive (cond) branch, anything else a negative (uncond) one.
SCOPES = ("positive", "negative", "both")


@dataclass(eq=False)
class IdentityStream:
    """One Apply node's identity: weights, tokens and where/when it acts."""

    pva: nn.Module  # PVAModel
    tokens: torch.Tensor  # [1 or B, M, context_dim]; trainers replace it every step
    strength: float = 1.0
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    scope: str = "positive"  # "positive": cond branch only; "negative": uncond only; "both"
    region: torch.Tensor | None = None  # [Bm, H, W] mask, 1 = identity applies
    # Training only: which samples of the batch see the identity (identity-token dropout, so
    # the model also learns the no-identity branch CFG needs). None: all of them.
    keep: torch.Tensor | None = None  # [B] bool
    _cache: dict = field(default_factory=dict, repr=False)

    def set_training_batch(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """A trainer's tokens ([1 or B, M, C]) and identity dropout ([B] bool) for the next step."""
        self.tokens = tokens
        self.keep = keep
        for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == "bias"]:
            del self._cache[key]

    def acts_on(self, branch: int) -> bool:
        """Does this identity act on samples of CFG branch `branch` (a cond_or_uncond value)?"""
        return self.scope == "both" or (branch == 0) == (self.scope == "positive")

    def is_active(self, transformer_options: dict) -> bool:
        if self.strength <= 0:
            return False
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        if self.scope != "both":
            if cond_or_uncond and not any(self.acts_on(c) for c in cond_or_uncond):
                return False  # a batch of the other branch only
            if not cond_or_uncond and self.scope == "negative":
                return False  # no CFG batch layout: the samples count as the positive branch
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        # Every layer of a step sees the same sigmas tensor: read it (a device sync) once.
        seen = self._cache.get("sigmas")
        if seen is None or seen[0] is not sigmas:
            seen = (sigmas, self.sigma_end <= float(sigmas.max()) <= self.sigma_start)
            self._cache["sigmas"] = seen
        return seen[1]

    def visual_keys(self, layer_name: str, x: torch.Tensor, transformer_options: dict) -> VisualKeys:
        bias = self._bias(x, transformer_options)
        to_q, key, value = self.projected(layer_name, x.device, x.dtype)
        return VisualKeys(query=F.linear(x, to_q), key=key, value=value, bias=bias)

    # -- weights and tokens, cast to where the hidden states are ---------------------------
    def projected(
        self, layer_name: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W'q, W'k z, W'v z) on device/dtype. Cached for inference; recomputed (and
        differentiable) while gradients are enabled, i.e. during training."""
        proj = self.pva.projections_for(layer_name)
        if torch.is_grad_enabled():
            return self._compute(proj, device, dtype)
        # inference tensors have no version counter, and cannot change in place anyway
        version = tuple(
            -1 if w.is_inference() else w._version
            for w in (proj.to_q.weight, proj.to_k.weight, proj.to_v.weight)
        )
        key = (layer_name, device, dtype, id(self.tokens), version)
        hit = self._cache.get(layer_name)
        if hit is None or hit[0] != key:
            hit = (key, self._compute(proj, device, dtype))
            self._cache[layer_name] = hit
        return hit[1]

    def _compute(self, proj: nn.Module, device: torch.device, dtype: torch.dtype):
        tokens = self.tokens.to(device=device, dtype=proj.to_k.weight.dtype)  # (float32: the PVA model's)
        key = F.linear(tokens, proj.to_k.weight.to(device)).to(dtype)
        value = F.linear(tokens, proj.to_v.weight.to(device)).to(dtype)
        return proj.to_q.weight.to(device=device, dtype=dtype), key, value

    # -- where the identity acts -----------------------------------------------------------
    def _bias(self, x: torch.Tensor, transformer_options: dict) -> torch.Tensor | None:
        """Log-space weight on this stream's scores, [B, 1, L or 1, 1], or None for 0.

        strength s multiplies the identity keys' share of attention by s before the joint
        softmax renormalizes (log-bias log s); -inf switches the stream off (strength 0
        anywhere is exactly the base model there)."""
        grid = _token_grid(x.shape[1], transformer_options) if self.region is not None else None
        return self.score_bias(x.shape[0], grid, transformer_options, x.device)

    def score_bias(
        self, batch: int, grid: tuple[int, int] | None, transformer_options: dict, device: torch.device
    ) -> torch.Tensor | None:
        """This stream's bias for a batch of `batch` on a (h, w) token grid: [B or 1, 1, h*w or 1, 1]."""
        cond_or_uncond = transformer_options.get("cond_or_uncond") if self.scope != "both" else None
        grid = grid if self.region is not None else None
        # The same for every layer with this token grid and every step with this batch layout.
        key = ("bias", batch, grid, tuple(cond_or_uncond or ()), device)
        if key not in self._cache:
            self._cache[key] = self._compute_bias(batch, grid, transformer_options, device)
        return self._cache[key]

    def _compute_bias(
        self, batch: int, grid: tuple[int, int] | None, transformer_options: dict, device: torch.device
    ) -> torch.Tensor | None:
        terms = []
        if self.strength != 1.0:
            terms.append(torch.full((1, 1, 1, 1), math.log(self.strength), device=device))
        if self.scope != "both":
            per_sample = self._acting_samples(transformer_options, batch, device)
            if per_sample is not None:
                terms.append(torch.where(per_sample, 0.0, -math.inf).view(batch, 1, 1, 1))
        if grid is not None:
            terms.append(self._region_at(batch, grid, device).log())
        if self.keep is not None:
            if self.keep.shape[0] != batch:
                raise PVAError(f"identity dropout: {self.keep.shape[0]} flags for a batch of {batch}.")
            terms.append(torch.where(self.keep.to(device), 0.0, -math.inf).view(batch, 1, 1, 1))
        if not terms:
            return None
        bias = terms[0]
        for term in terms[1:]:
            bias = bias + term
        return bias

    def _acting_samples(
        self, transformer_options: dict, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """Bool [B]: the samples of the branches this identity acts on; None when it acts on all."""
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        if not cond_or_uncond:
            return None
        flags = [self.acts_on(c) for c in cond_or_uncond]
        if all(flags):
            return None
        chunk = batch // len(cond_or_uncond)
        return torch.tensor(flags, device=device).repeat_interleave(chunk)

    def _region_at(self, batch: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The region mask resized to a layer's token grid, [1 or B, 1, h*w, 1]."""
        height, width = grid
        region = self.region.to(device=device, dtype=torch.float32).unsqueeze(1)
        hit = F.interpolate(region, size=(height, width), mode="area").clamp(0, 1)
        hit = hit.view(region.shape[0], 1, height * width, 1)
        masks = hit.shape[0]
        if masks == 1 or masks == batch:
            return hit
        if batch % masks:
            raise PVAError(
                f"mask: {masks} masks cannot be matched to a batch of {batch} latents; give 1 mask or one per latent."
            )
        return hit.repeat(batch // masks, 1, 1, 1)  # the CFG batch stacks whole latent batches


def _token_grid(length: int, transformer_options: dict) -> tuple[int, int]:
    """(h, w) of the token grid at this layer."""
    shape = transformer_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == length:
        return shape[-2], shape[-1]
    original = transformer_options.get("original_shape")
    if original is not None:
        height, width = original[-2], original[-1]
        while height * width > length:
            height, width = (height + 1) // 2, (width + 1) // 2
        if height * width == length:
            return height, width
    side = int(math.isqrt(length))
    if side * side != length:
        raise PVAError(
            "identity region mask: cannot tell this layer's image grid; use a square image or no mask."
        )
    return side, side


class ParallelCrossAttention(nn.Module):
    """Stands in for one ComfyUI CrossAttention: the original computation plus any identity
    streams, in one fused attention call. With no active stream it *is* the original."""

    def __init__(self, original: nn.Module, layer_name: str, streams: tuple[IdentityStream, ...]):
        super().__init__()
        # The original's projections, registered under their own names: state-dict keys,
        # LoRA weight patches and low-VRAM casting see exactly the modules they expect.
        self.to_q, self.to_k, self.to_v, self.to_out = (
            original.to_q,
            original.to_k,
            original.to_v,
            original.to_out,
        )
        self.heads, self.dim_head = original.heads, getattr(original, "dim_head", None)
        self.attn_precision = getattr(original, "attn_precision", None)
        object.__setattr__(self, "original", original)  # kept out of named_modules()
        object.__setattr__(self, "pva_streams", streams)
        self.layer_name = layer_name

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        transformer_options: dict = {},  # noqa: B006  (ComfyUI's CrossAttention signature)
    ) -> torch.Tensor:
        streams = (
            [s for s in self.pva_streams if s.is_active(transformer_options)] if context is not None else []
        )
        if not streams or mask is not None:
            return self.original(
                x, context=context, value=value, mask=mask, transformer_options=transformer_options
            )
        # Under CFG each branch's samples attend only to the identities acting on that branch
        # (none: the original, cheaper attention) instead of the wide call with the others
        # masked out.
        outputs = []
        for rows, options, acting in _branch_groups(streams, transformer_options, x, context):
            x_part, context_part = x[rows], context[rows]
            value_part = value[rows] if value is not None else None
            if acting:
                outputs.append(self._parallel(x_part, context_part, value_part, list(acting), options))
            else:
                outputs.append(
                    self.original(x_part, context=context_part, value=value_part, transformer_options=options)
                )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _parallel(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        value: torch.Tensor | None,
        streams: list[IdentityStream],
        transformer_options: dict,
    ) -> torch.Tensor:
        visual = [s.visual_keys(self.layer_name, x, transformer_options) for s in streams]
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(value if value is not None else context)
        # ComfyUI's policy: the layer's own precision, --dont-upcast-attention, and the forced
        # fp32 upcast of fp16 attention on some platforms (macOS >= 14.5)
        precision = attention_precision(self.attn_precision, q.dtype)
        upcast = precision == torch.float32 and q.dtype in (torch.float16, torch.bfloat16)
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
            visual = [VisualKeys(s.query.float(), s.key.float(), s.value.float(), s.bias) for s in visual]
        out = parallel_attention(q, k, v, visual, self.heads)
        return self.to_out(out.to(x.dtype))


def _branch_groups(
    streams: list[IdentityStream], transformer_options: dict, x: torch.Tensor, context: torch.Tensor
) -> list[tuple[slice, dict, tuple[IdentityStream, ...]]]:
    """Split a CFG batch into runs of consecutive branch chunks that see the same identities:
    [(rows, transformer_options for those rows, the streams acting there)]. Where it cannot be
    split, one group of all rows with every stream (their biases then mask the other branch)."""
    cond_or_uncond = transformer_options.get("cond_or_uncond")
    batch = x.shape[0]
    whole = [(slice(None), transformer_options, tuple(streams))]
    if not cond_or_uncond or context.shape[0] != batch or batch % len(cond_or_uncond):
        return whole
    if all(s.scope == "both" for s in streams) or any(s.tokens.shape[0] != 1 for s in streams):
        return whole
    chunk = batch // len(cond_or_uncond)
    acting = [tuple(s for s in streams if s.acts_on(c)) for c in cond_or_uncond]
    groups: list[tuple[slice, dict, tuple[IdentityStream, ...]]] = []
    start = 0
    for i in range(1, len(cond_or_uncond) + 1):
        if i < len(cond_or_uncond) and acting[i] == acting[start]:
            continue
        rows = slice(start * chunk, i * chunk)
        options = dict(transformer_options, cond_or_uncond=cond_or_uncond[start:i])
        groups.append((rows, options, acting[start]))
        start = i
    return groups


def _warn_about_attention_replacements(model_patcher: "ModelPatcher") -> None:
    """Another pack's attn2 replace patch (IP-Adapter, InstantID ...) makes ComfyUI skip the
    attention module on that layer, and with it the identity: say so instead of failing silently."""
    options = model_patcher.model_options.get("transformer_options", {})
    replaced = options.get("patches_replace", {}).get("attn2", {})
    if replaced:
        logging.warning(
            "[PVA] %d cross-attention layers of this MODEL are replaced by another node's attention patch "
            "(e.g. IP-Adapter); the PVA identity has no effect on those layers.",
            len(replaced),
        )


_ARCHITECTURE = {"cross_attention": "UNet with cross-attention", JOINT: "DiT with joint attention"}


def check_compatible(pva: nn.Module, model_patcher: "ModelPatcher") -> None:
    """Explain, in the user's terms, why a PVA model does not fit a MODEL."""
    layers = require_layers(model_patcher)
    model_family = type(model_patcher.model.model_config).__name__
    if layers[0].kind != pva.layers[0].kind:
        raise PVAError(
            f"pva_model: this PVA model was made for {pva.describe()}, a {_ARCHITECTURE[pva.layers[0].kind]}; "
            f"the MODEL is {model_family}, a {_ARCHITECTURE[layers[0].kind]}. Load a PVA file made for "
            f"{model_family}, or initialize one from this MODEL."
        )
    model_context = layers[0].context_dim
    if model_context != pva.context_dim:
        raise PVAError(
            f"pva_model: this PVA model was made for {pva.describe()}; the MODEL is "
            f"{family_label(model_context)} ({model_family}, {model_context}-d context). "
            "Load a PVA file made for this model family, or initialize one from this MODEL."
        )
    ours = {s.name: s for s in pva.layers}
    theirs = {s.name: s for s in layers}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    shape = [n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n]]
    if missing or extra or shape:
        example = (missing or extra or shape)[0]
        raise PVAError(
            f"pva_model: its cross-attention layers do not match the MODEL's ({model_family}): "
            f"{len(missing)} layers missing, {len(extra)} unknown, {len(shape)} with other shapes "
            f"(e.g. {example}). This PVA model was made for a differently built {pva.describe()}."
        )


def identity_stream(
    model_patcher: "ModelPatcher",
    pva: nn.Module,
    tokens: torch.Tensor,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    scope: str = "positive",
    region: torch.Tensor | None = None,
) -> IdentityStream:
    """One identity's stream for `model_patcher`, its settings checked."""
    check_compatible(pva, model_patcher)
    if scope not in SCOPES:
        raise PVAError(f"apply_to: must be one of {SCOPES}, got {scope!r}.")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise PVAError(
            f"start_percent/end_percent: need 0 <= start <= end <= 1, got {start_percent}, {end_percent}."
        )
    if strength < 0:
        raise PVAError(f"strength: must be >= 0, got {strength}.")
    if tokens.dim() != 3 or tokens.shape[-1] != pva.context_dim:
        raise PVAError(f"identity: tokens of shape {tuple(tokens.shape)} do not fit {pva.describe()}.")
    if region is not None:
        region = region.unsqueeze(0) if region.dim() == 2 else region
        if region.dim() != 3:
            raise PVAError(f"mask: expected a MASK of shape [H, W] or [B, H, W], got {tuple(region.shape)}.")
    sampling = model_patcher.get_model_object("model_sampling")
    return IdentityStream(
        pva=pva,
        tokens=tokens,
        strength=float(strength),
        sigma_start=sampling.percent_to_sigma(start_percent),
        sigma_end=sampling.percent_to_sigma(end_percent),
        scope=scope,
        region=None if region is None else region.float().cpu(),
    )


def attach(model_patcher: "ModelPatcher", stream: IdentityStream) -> "ModelPatcher":
    """A clone of `model_patcher` whose cross-attention layers also attend to `stream`'s identity.

    Chaining (attaching to an already patched MODEL) adds a stream: all identities share one
    fused attention call per layer. Whoever made the stream keeps it and may change its tokens
    (a trainer sets new ones every step)."""
    check_compatible(stream.pva, model_patcher)
    patched = model_patcher.clone()
    if stream.pva.layers[0].kind == JOINT:
        attach_joint(patched, stream)
        return patched
    _warn_about_attention_replacements(model_patcher)
    for spec in stream.pva.layers:
        key = f"diffusion_model.{spec.name}"
        current = patched.get_model_object(key)
        original = getattr(current, "original", current)
        streams = getattr(current, "pva_streams", ())
        patched.add_object_patch(key, ParallelCrossAttention(original, spec.name, streams + (stream,)))
    return patched


def is_attached(patched: "ModelPatcher", pva: nn.Module) -> bool:
    """Whether the live model runs with the identity: a UNet's object patches are applied only
    while ComfyUI keeps the patched clone loaded; an MMDiT's block replacements always are."""
    if pva.layers[0].kind == JOINT:
        return True
    layer = patched.model.diffusion_model.get_submodule(pva.layers[0].name)
    return hasattr(layer, "pva_streams")


def apply_identity(
    model_patcher: "ModelPatcher",
    pva: nn.Module,
    tokens: torch.Tensor,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    scope: str = "positive",
    region: torch.Tensor | None = None,
) -> "ModelPatcher":
    """A clone of `model_patcher` whose cross-attention layers also attend to `tokens` (what
    Apply PVA Identity does)."""
    stream = identity_stream(model_patcher, pva, tokens, strength, start_percent, end_percent, scope, region)
    return attach(model_patcher, stream)
