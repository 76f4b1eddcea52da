"""The fused parallel attention equals the formula written out with explicit score matrices."""

import math

import pytest
import torch

from pva.method.attention import VisualKeys, parallel_attention, parallel_attention_reference

HEADS, DIM_HEAD, TEXT, TOKENS = 8, 40, 77, 10


def _inputs(batch=2, length=64, streams=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    inner = HEADS * DIM_HEAD

    def r(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = r(batch, length, inner), r(batch, TEXT, inner), r(batch, TEXT, inner)
    visual = [
        VisualKeys(r(batch, length, inner), r(1, TOKENS, inner), r(1, TOKENS, inner)) for _ in range(streams)
    ]
    return q, k, v, visual


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_fused_equals_reference(streams):
    q, k, v, visual = _inputs(streams=streams)
    fused = parallel_attention(q, k, v, visual, HEADS)
    reference = parallel_attention_reference(q, k, v, visual, HEADS)
    assert (fused - reference).abs().max() <= 1e-5


def test_fused_equals_reference_with_region_mask_and_strength():
    q, k, v, visual = _inputs(streams=2)
    g = torch.Generator().manual_seed(3)
    region = (torch.rand(2, 1, 64, 1, generator=g) > 0.5).float()  # per sample and query position
    biased = [
        VisualKeys(visual[0].query, visual[0].key, visual[0].value, region.log() + math.log(0.7)),
        VisualKeys(visual[1].query, visual[1].key, visual[1].value, torch.full((1, 1, 1, 1), math.log(2.0))),
    ]
    fused = parallel_attention(q, k, v, biased, HEADS)
    reference = parallel_attention_reference(q, k, v, biased, HEADS)
    assert (fused - reference).abs().max() <= 1e-5
    # and the bias really matters: without it the result differs
    assert (fused - parallel_attention(q, k, v, visual, HEADS)).abs().max() > 1e-3


def test_one_joint_softmax_not_two():
    """Identity keys take attention mass away from the text keys (joint normalization)."""
    q, k, v, visual = _inputs(streams=1)
    text_only = parallel_attention(q, k, v, [], HEADS)
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, -1, HEADS, DIM_HEAD).transpose(1, 2) for t in (q, k, v))
    )
    assert torch.equal(text_only, plain.transpose(1, 2).reshape(2, 64, -1))
    # zero identity values: output is the text output scaled by the text keys' share (< 1)
    silent = [VisualKeys(visual[0].query, visual[0].key, torch.zeros_like(visual[0].value))]
    shrunk = parallel_attention(q, k, v, silent, HEADS)
    ratio = shrunk.norm() / text_only.norm()
    assert 0.0 < ratio < 0.999


def test_region_minus_infinity_recovers_text_attention():
    q, k, v, visual = _inputs(streams=1)
    off = [VisualKeys(visual[0].query, visual[0].key, visual[0].value, torch.full((1, 1, 1, 1), -math.inf))]
    assert (
        parallel_attention(q, k, v, off, HEADS) - parallel_attention(q, k, v, [], HEADS)
    ).abs().max() <= 1e-6
