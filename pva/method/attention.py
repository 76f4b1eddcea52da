"""Parallel visual attention: the math, independent of the module it runs in.

Per head, with text query/key/value (q, k, v) and, for each identity stream i, its own
visual query/key/value (q_i = W'q x, k_i = W'k z_i, v_i = W'v z_i):

    A   = softmax([q k^T, q_1 k_1^T, q_2 k_2^T, ...] * s + bias)     (one softmax over all keys)
    out = A [v; v_1; v_2; ...]

One fused `scaled_dot_product_attention` call computes it: queries are concatenated along the
head dimension, [q | q_1 | ...], and each key block is zero-padded into its own slot of that
wider dimension, so the dot product of the wide query with a text key is exactly q.k and
with an identity-i key exactly q_i.k_i. The scale stays 1/sqrt(head_dim).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VisualKeys:
    """One identity stream's inputs to a layer: projected query, keys, values and a score bias.

    bias is added to this stream's scores: log(strength), -inf where the stream is off
    (outside its region, or on CFG branches it does not apply to). Shape broadcastable to
    [B, 1, L, M]; None means 0 (strength 1 everywhere)."""

    query: torch.Tensor  # [B, L, inner]
    key: torch.Tensor  # [B or 1, M, inner]
    value: torch.Tensor  # [B or 1, M, inner]
    bias: torch.Tensor | None = None


def _heads(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[b, n, heads*d] -> [batch, heads, n, d] (b may be 1 and is then broadcast)."""
    b, n, inner = t.shape
    t = t.view(b, n, heads, inner // heads).transpose(1, 2)
    return t.expand(batch, -1, -1, -1) if b != batch else t


def parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streams: list[VisualKeys], heads: int
) -> torch.Tensor:
    """Joint text + identity attention in one fused call. q: [B, L, inner]; k, v: [B, T, inner].

    Returns [B, L, inner], like ComfyUI's optimized_attention."""
    batch, length, inner = q.shape
    dim_head = inner // heads
    slots = 1 + len(streams)
    width = slots * dim_head

    queries = [_heads(q, batch, heads)] + [_heads(s.query, batch, heads) for s in streams]
    keys = [_heads(k, batch, heads)] + [_heads(s.key, batch, heads) for s in streams]
    values = [_heads(v, batch, heads)] + [_heads(s.value, batch, heads) for s in streams]
    wide_keys = [F.pad(key, (i * dim_head, width - (i + 1) * dim_head)) for i, key in enumerate(keys)]

    # Values are zero-padded to the same width and the output sliced back: SDPA's fast kernels
    # (CPU flash, CUDA efficient/flash) require equal query, key and value head sizes.
    wide_values = F.pad(torch.cat(values, dim=2), (0, width - dim_head))
    out = F.scaled_dot_product_attention(
        torch.cat(queries, dim=-1),
        torch.cat(wide_keys, dim=2),
        wide_values,
        attn_mask=_joint_bias(streams, batch, length, k.shape[1], q.dtype, q.device),
        scale=dim_head**-0.5,
    )
    return out[..., :dim_head].transpose(1, 2).reshape(batch, length, inner)


def _joint_bias(
    streams: list[VisualKeys],
    batch: int,
    length: int,
    text_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive mask [B, 1, L or 1, T + sum(M)]: zeros on text keys, each stream's bias on its keys."""
    if all(s.bias is None for s in streams):
        return None
    rows = max(1 if s.bias is None else s.bias.shape[-2] for s in streams)
    parts = [torch.zeros(batch, 1, rows, text_len, dtype=dtype, device=device)]
    for s in streams:
        size = (batch, 1, rows, s.key.shape[1])
        parts.append(
            torch.zeros(size, dtype=dtype, device=device) if s.bias is None else s.bias.to(dtype).expand(size)
        )
    return torch.cat(parts, dim=-1)


def parallel_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streams: list[VisualKeys], heads: int
) -> torch.Tensor:
    """The formula written out with explicit score matrices: the readable spec that tests and
    the benchmark compare the fused version against. Not used at run time."""
    batch, length, inner = q.shape
    scale = (inner // heads) ** -0.5
    scores = [_heads(q, batch, heads) @ _heads(k, batch, heads).transpose(-1, -2) * scale]
    values = [_heads(v, batch, heads)]
    for s in streams:
        visual = _heads(s.query, batch, heads) @ _heads(s.key, batch, heads).transpose(-1, -2) * scale
        if s.bias is not None:
            visual = visual + s.bias
        scores.append(visual)
        values.append(_heads(s.value, batch, heads))
    weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = weights @ torch.cat(values, dim=2)
    return out.transpose(1, 2).reshape(batch, length, inner)
