"""Parallel visual attention on an MMDiT's joint attention (Flux's double-stream blocks,
Qwen-Image's transformer blocks).

In a double-stream block, text tokens t and image tokens x have their own projections and then
attend together in one softmax over the keys [t; x]. PVA adds the identity tokens z (the identity
encoder's output, in the model's hidden width) as further keys of that same softmax, for the
image queries only. Per head, for image token i:

    out_i = softmax([q_i K_t^T, q_i K_x^T, q'_i K'_z^T + b_i] / sqrt(d)) [V_t; V_x; V'_z]
    q'_i  = RoPE_i(normq(W'q x_i)),   K'_z = normk(W'k z),   V'_z = W'v z

normq / normk are the block's own QK-norms (the image stream's query norm, the text stream's key
norm); b_i = log(strength) plus -inf where the identity is off (outside the region, on other CFG
branches, on Kontext's reference-image tokens). Text rows are the block's own computation. W' start
as the block's image query weights and text key/value weights (without their biases), so at
initialization identity tokens are read the way the block reads text tokens. Decisions:
- Identity keys get the text keys' QK-norm and no rotation: Flux's text tokens sit at position 0,
  where RoPE is the identity, so identity tokens are positioned like text. (Qwen-Image gives its
  text tokens positions after the image's; identity tokens stay unrotated there too: they have no
  place in the sequence.) The parallel query gets the image query's rotation, as the image queries
  that meet the text keys have it.
- Text queries do not attend to identity tokens: the identity acts on the image (and only within
  its region), and the text stream stays the prompt's.
- Double-stream blocks only: single-stream blocks have no separate text projection to initialize
  W'k/W'v from, and the double-stream blocks are where Flux's text conditions the image.

The host's own block runs unchanged; its one attention call is widened through ComfyUI's
attention override into one SDPA call (joint_attention; joint_attention_reference is the formula
written out).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..host import mmdit
from ..host.models import attention_precision
from .attention import VisualKeys

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher


class Stream(Protocol):
    """What a block needs of an identity (patching.IdentityStream)."""

    pva: nn.Module  # its PVAModel

    def is_active(self, transformer_options: dict) -> bool: ...

    def projected(
        self, layer_name: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def score_bias(
        self, batch: int, grid: tuple[int, int] | None, transformer_options: dict, device: torch.device
    ) -> torch.Tensor | None: ...


class JointBlockIdentity:
    """The `dit` ("double_block", i) replacement of one block: the host's block, with the image
    queries of its joint attention also attending to the streams' identity tokens."""

    def __init__(self, block: nn.Module, layer_name: str, streams: tuple[Stream, ...], inner=None):  # noqa: ANN001
        self.block = block
        self.layer_name = layer_name
        self.streams = streams
        self.inner = inner  # another node's replacement of this block, run inside this one

    def __deepcopy__(self, memo: dict) -> JointBlockIdentity:
        # ModelPatcher.clone deep-copies model_options: share the block and the PVA weights.
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        streams = [s for s in self.streams if s.is_active(options)]
        run = (
            extra["original_block"] if self.inner is None else functools.partial(self._run_inner, extra=extra)
        )
        if not streams or args.get("attn_mask") is not None:
            return run(args)
        img, txt = args["img"], args["txt"]
        text_len, image_len = txt.shape[1], img.shape[1]
        rows = slice(text_len, text_len + image_len) if mmdit.text_first(self.block) else slice(0, image_len)
        pe = args["pe"]
        x = mmdit.image_input(self.block, img, args["vec"])
        grid = options.get(mmdit.GRID_KEY)
        visual = [
            self._visual_keys(s, x, None if pe is None else pe[:, :, rows], grid, options) for s in streams
        ]
        override = functools.partial(
            _joint_attention, visual=visual, rows=rows, previous=options.get("optimized_attention_override")
        )
        return run(dict(args, transformer_options=dict(options, optimized_attention_override=override)))

    def _run_inner(self, args: dict, extra: dict) -> dict:
        return self.inner(args, extra)

    def _visual_keys(
        self,
        stream: Stream,
        x: torch.Tensor,
        pe: torch.Tensor | None,
        grid: tuple[int, int] | None,
        options: dict,
    ) -> VisualKeys:
        """One stream's parallel queries [B, I, inner] for the image rows, its keys and values
        [1, M, inner] and its bias [B or 1, 1, I or 1, 1]."""
        batch, length, _ = x.shape
        heads = mmdit.block_width(self.block)[1]
        to_q, key, value = stream.projected(self.layer_name, x.device, x.dtype)
        query = _split(F.linear(x, to_q), heads)
        query = mmdit.norm_query(self.block, query)
        if pe is not None:
            query = mmdit.rotate(query, pe)
        key = mmdit.norm_key(self.block, _split(key, heads))
        bias = stream.score_bias(batch, grid, options, x.device)
        return VisualKeys(
            _merge(query), _merge(key).to(x.dtype), value, _image_rows(bias, batch, length, grid, x.device)
        )


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads*D] -> [B, heads, L, D]"""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, D] -> [B, L, heads*D]"""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _image_rows(
    bias: torch.Tensor | None, batch: int, length: int, grid: tuple[int, int] | None, device: torch.device
) -> torch.Tensor | None:
    """A stream's bias over all `length` image tokens: the target image's h*w tokens come first;
    tokens after them (Kontext's reference images) never see the identity."""
    target = length if grid is None else grid[0] * grid[1]
    if target >= length:
        return bias
    inside = torch.zeros(1, 1, 1, 1, device=device) if bias is None else bias
    inside = inside.expand(batch, 1, target, 1)
    outside = torch.full((batch, 1, length - target, 1), -math.inf, device=inside.device, dtype=inside.dtype)
    return torch.cat([inside, outside], dim=2)


def _joint_attention(func, *args, visual: list[VisualKeys], rows: slice, previous, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """ComfyUI's attention override inside one double-stream block: q, k, v [B, H, N, D] of the
    joint [text; image] sequence (roped and normed by the block) -> [B, N, H*D], with the image
    rows also attending to the identity keys in the same softmax."""
    if kwargs.get("mask") is not None or not kwargs.get("skip_reshape"):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
    q, k, v = (mmdit.plain(t) for t in args[:3])
    dtype = q.dtype
    precision = attention_precision(kwargs.get("attn_precision"), dtype)
    work = torch.float32 if precision == torch.float32 else dtype
    visual = [VisualKeys(s.query.to(work), s.key.to(work), s.value.to(work), s.bias) for s in visual]
    out = joint_attention(q.to(work), k.to(work), v.to(work), visual, rows).to(dtype)
    return out if kwargs.get("skip_output_reshape") else _merge(out)


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visual: list[VisualKeys], rows: slice
) -> torch.Tensor:
    """The joint softmax with identity keys for the image rows, in one fused SDPA call.

    q, k, v: [B, H, N, D] of the joint sequence (as the block computes them); visual: per identity
    stream, its queries for the image rows [B, I, H*D], keys and values [1 or B, M, H*D], bias
    over the image rows. Returns [B, H, N, D].

    The identity scores are few per row (M), so they are computed first, S = q' K'^T + b/scale
    ([B, H, I, M]), and appended to each row's query as M extra channels; each identity key is a
    one-hot on its channel (and zero on the head's D channels), each text/image key zero on the
    extra channels. One call over head width D + sum(M) (padded to a multiple of 8, as the fast
    kernels want) then scores q.k for the block's keys and S for the identity keys, in the same
    softmax. (attention.py's construction, a second query of width D per stream, would double
    the cost of this N x N attention; this one adds sum(M)/D.) In bf16/fp16, S enters the kernel
    rounded to that precision once, as q and k themselves do."""
    batch, heads, length, dim = q.shape
    scale = dim**-0.5
    extra = sum(s.key.shape[1] for s in visual)
    width = -(-(dim + extra) // 8) * 8
    scores = torch.cat([_identity_scores(s, batch, heads, scale) for s in visual], dim=-1)  # [B, H, I, M]
    # each wide tensor is made once and filled in place (no intermediate copies of N x D)
    wide_q = q.new_zeros(batch, heads, length, width)
    wide_q[..., :dim] = q
    wide_q[..., dim : dim + extra] = _OFF / scale
    wide_q[:, :, rows, dim : dim + extra] = scores.to(q.dtype)
    wide_k = k.new_zeros(batch, heads, length + extra, width)
    wide_k[:, :, :length, :dim] = k
    channels = torch.arange(extra, device=k.device)
    wide_k[:, :, length + channels, dim + channels] = 1.0  # identity key j: 1 on channel D + j
    wide_v = v.new_zeros(batch, heads, length + extra, width)
    wide_v[:, :, :length, :dim] = v
    wide_v[:, :, length:, :dim] = torch.cat(
        [_split(s.value, heads).expand(batch, -1, -1, -1) for s in visual], dim=2
    )
    return F.scaled_dot_product_attention(wide_q, wide_k, wide_v, scale=scale)[..., :dim]


# The score of an identity key where it is off (text rows, outside a region, other branches):
# finite, so that it can sit in a query (0 x -inf would be NaN), and exp(-2000) is 0 in every
# float format.
_OFF = -2000.0


def _identity_scores(s: VisualKeys, batch: int, heads: int, scale: float) -> torch.Tensor:
    """q' K'^T + bias / scale, [B, H, I, M] (the bias's -inf as _OFF)."""
    query, key = _split(s.query, heads), _split(s.key, heads)
    scores = query @ key.transpose(-1, -2).to(query.dtype)
    if s.bias is None:
        return scores
    bias = s.bias.to(device=scores.device, dtype=torch.float32).clamp(min=_OFF)
    return (scores.float() + bias / scale).to(scores.dtype).expand(batch, heads, -1, -1)


def joint_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visual: list[VisualKeys], rows: slice
) -> torch.Tensor:
    """The module docstring's formula written out row block by row block, with explicit score
    matrices: the spec the tests compare the fused version against. Not used at run time."""
    batch, heads, _, dim = q.shape
    scale = dim**-0.5
    out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v  # text rows (and all rows before z)
    image_q = q[:, :, rows]
    scores = [image_q @ k.transpose(-1, -2) * scale]
    values = [v]
    for s in visual:
        key, value = (_split(t, heads).expand(batch, -1, -1, -1) for t in (s.key, s.value))
        extra = _split(s.query, heads) @ key.transpose(-1, -2) * scale
        scores.append(extra if s.bias is None else extra + s.bias)
        values.append(value)
    image_out = torch.softmax(torch.cat(scores, dim=-1), dim=-1) @ torch.cat(values, dim=2)
    return torch.cat([out[:, :, : rows.start], image_out, out[:, :, rows.stop :]], dim=2)


def attach_joint(patched: ModelPatcher, stream: Stream) -> None:
    """Give each of the stream's blocks in `patched` (a clone) a replacement carrying it, added to
    the streams a previous Apply put there (all share one widened attention call)."""
    for spec in stream.pva.layers:
        current = mmdit.block_replacement(patched, spec.name)
        if isinstance(current, JointBlockIdentity):
            streams, inner = current.streams, current.inner
        else:  # nothing, or another node's replacement (which then runs inside ours)
            streams, inner = (), current
        block = patched.get_model_object(f"diffusion_model.{spec.name}")
        replacement = JointBlockIdentity(block, spec.name, (*streams, stream), inner)
        mmdit.set_block_replacement(patched, spec.name, replacement)
    mmdit.record_image_grid(patched)
