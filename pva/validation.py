"""Validation during pretraining, on people it never trains on.

identity_gaps: the denoising loss in the masked face region with the person's own identity
tokens, with no identity, and with another held-out person's tokens. A model that learned what
a face embedding says about a face reconstructs a person best from their own tokens: the gaps
(none / own, other / own) are the identity signal.

preview_grid: a few held-out faces inpainted with their own identity (a short Euler sampler on
the training session's model), shown beside the masked input and the original.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .datasets import FaceDataset
from .errors import PVAError
from .preprocess import PersonFaces
from .pretraining_data import PretrainingSamples, collate

if TYPE_CHECKING:
    from .pretraining import PretrainingConfig, PretrainingSession, PretrainingStep

VALIDATION_SEED = 1_000_003  # held-out samples never share a seed with training samples


def validation_samples(
    dataset: FaceDataset, faces: dict[str, PersonFaces], people: list[str], config: PretrainingConfig
) -> PretrainingSamples:
    """Fixed held-out samples: always the identity, never the dataset's caption lottery changing."""
    settings = replace(config.samples, identity_dropout=0.0, with_crops=config.stage == 2)
    return PretrainingSamples(dataset, faces, people, settings, seed=config.seed + VALIDATION_SEED)


def _with_other_references(samples: PretrainingSamples, index: int, sample: dict) -> dict:
    """The sample's references replaced by another held-out person's."""
    rng = random.Random(f"pva-other:{samples.seed}:{index}")
    others = [p for p in samples.people if p != sample["person"]]
    other = samples.faces[others[rng.randrange(len(others))]]
    return dict(sample, **samples.references(other, None, rng))


def _face_weight(batch: dict, x0: torch.Tensor, bins: int) -> torch.Tensor:
    weight = F.interpolate(batch["mask"][:, None].float(), x0.shape[-2:])
    return weight.repeat_interleave(bins, dim=0).to(x0.device)


@torch.no_grad()
def identity_gaps(
    session: PretrainingSession,
    step_module: PretrainingStep,
    samples: PretrainingSamples,
    count: int,
    batch_size: int,
    accelerator,  # noqa: ANN001
) -> dict[str, float]:
    """Mean face-region loss over `count` held-out samples (split across processes) with the
    own, no, and another person's identity tokens."""
    if len(samples.people) < 2:
        raise PVAError("validation: needs at least 2 held-out people (one serves as 'another person').")
    indices = list(range(accelerator.process_index, count, accelerator.num_processes))
    sums = torch.zeros(4, device=session.device)  # own, none, other, samples
    was_training = step_module.training
    step_module.eval()
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            items = [samples[i] for i in chunk]
            batch = collate(items)
            prepared = session.prepare(batch)
            bins = prepared["x0"].shape[0] // len(chunk)
            weight = _face_weight(batch, prepared["x0"], bins)
            other = session.prepare(
                collate([_with_other_references(samples, i, s) for i, s in zip(chunk, items, strict=True)])
            )
            own_tokens = step_module.tokens(prepared).repeat_interleave(bins, dim=0)
            other_tokens = step_module.tokens(other).repeat_interleave(bins, dim=0)
            everyone = torch.ones(prepared["x0"].shape[0], dtype=torch.bool, device=session.device)
            for slot, (tokens, keep) in enumerate(
                ((own_tokens, everyone), (own_tokens, ~everyone), (other_tokens, everyone))
            ):
                loss = session.loss(
                    prepared["conds"],
                    prepared["x0"],
                    prepared["sigmas"],
                    prepared["noise"],
                    tokens,
                    keep,
                    weight,
                )
                sums[slot] += loss * len(chunk)
            sums[3] += len(chunk)
    finally:
        step_module.train(was_training)
    totals = accelerator.reduce(sums, reduction="sum")
    own, none, other = (totals[:3] / totals[3].clamp(min=1)).tolist()
    return {
        "own": own,
        "none": none,
        "other": other,
        "none_over_own": none / own,
        "other_over_own": other / own,
    }


@torch.no_grad()
def preview_grid(
    session: PretrainingSession,
    step_module: PretrainingStep,
    samples: PretrainingSamples,
    count: int,
    steps: int,
) -> torch.Tensor:
    """[H, W, 3] image: per held-out sample a row of masked input | inpainted | original."""
    import comfy.samplers

    items = [samples[i] for i in range(count)]
    batch = collate(items)
    prepared = session.prepare(batch, bins=1)
    tokens = step_module.tokens(prepared)
    sampling = session.patched.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "karras", steps).to(session.device)
    x0 = prepared["x0"]
    known = 1 - F.interpolate(batch["mask"][:, None].float(), x0.shape[-2:]).to(x0.device)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = sampling.noise_scaling(sigmas[0].expand(x0.shape[0]), noise, x0, max_denoise=True)
    was_training = step_module.training
    step_module.eval()
    try:
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = session.denoise(prepared["conds"], x, sigma.expand(x0.shape[0]), tokens)
            denoised = denoised * (1 - known) + x0 * known  # the photo outside the mask, as KSampler keeps it
            x = x + (x - denoised) / sigma * (following - sigma)  # Euler
    finally:
        step_module.train(was_training)
    decoded = session.base.vae.decode(session.patched.model.process_latent_out(x)).float().cpu()
    pixels = batch["pixels"].float()
    masked = pixels * (1 - batch["mask"][..., None]) + 0.5 * batch["mask"][..., None]
    decoded = decoded[:, : pixels.shape[1], : pixels.shape[2]].clamp(0, 1)
    rows = [torch.cat([masked[i], decoded[i], pixels[i]], dim=1) for i in range(len(items))]
    return torch.cat(rows, dim=0)
