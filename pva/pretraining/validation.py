"""Validation during pretraining, on people it never trains on.

identity_gaps: the denoising loss in the masked face region with the person's own identity
tokens, with no identity, and with another held-out person's tokens. A model that learned what
a face embedding says about a face reconstructs a person best from their own tokens: the gaps
(none / own, other / own) are the identity signal. held_out_identity_gaps measures any PVA model
that way, outside a run.

preview_grid: a few held-out faces inpainted with their own identity (a short Euler sampler on
the training session's model), shown beside the masked input and the original.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.datasets import FaceDataset
from ..data.preprocess import PersonFaces
from ..errors import PVAError
from ..host.sampling import karras_sigmas
from ..method.model import PVAModel
from ..training.session import face_weight, training_mode
from .config import PretrainingConfig
from .samples import PretrainingSamples, Sample, SampleBatch
from .session import Base, PretrainingSession, PretrainingStep, text_cache_for

if TYPE_CHECKING:
    from accelerate import Accelerator

VALIDATION_SEED = 1_000_003  # held-out samples never share a seed with training samples


def validation_samples(
    dataset: FaceDataset, faces: dict[str, PersonFaces], people: list[str], config: PretrainingConfig
) -> PretrainingSamples:
    """Fixed held-out samples: always the identity, never the dataset's caption lottery changing."""
    settings = replace(config.samples, identity_dropout=0.0, with_crops=config.stage == 2)
    return PretrainingSamples(dataset, faces, people, settings, seed=config.seed + VALIDATION_SEED)


def _with_other_references(samples: PretrainingSamples, index: int, sample: Sample) -> Sample:
    """The sample's references replaced by another held-out person's."""
    rng = random.Random(f"pva-other:{samples.seed}:{index}")
    others = [p for p in samples.people if p != sample.person]
    other = samples.faces[others[rng.randrange(len(others))]]
    return replace(sample, references=samples.references(other, None, rng))


@torch.no_grad()
def identity_gaps(
    session: PretrainingSession,
    step_module: PretrainingStep,
    samples: PretrainingSamples,
    count: int,
    batch_size: int,
    accelerator: Accelerator,
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
            batch = SampleBatch.of(items)
            prepared = session.prepare(batch)
            bins = prepared.bins
            x0 = prepared.training.x0
            weight = face_weight(batch.mask, x0.shape[-2:], bins).to(x0.device)
            other = session.prepare(
                SampleBatch.of(
                    [_with_other_references(samples, i, s) for i, s in zip(chunk, items, strict=True)]
                )
            )
            own_tokens = step_module.tokens(prepared.references).repeat_interleave(bins, dim=0)
            other_tokens = step_module.tokens(other.references).repeat_interleave(bins, dim=0)
            everyone = torch.ones(x0.shape[0], dtype=torch.bool, device=session.device)
            for slot, (tokens, keep) in enumerate(
                ((own_tokens, everyone), (own_tokens, ~everyone), (other_tokens, everyone))
            ):
                loss = session.loss(replace(prepared.training, keep=keep, face_weight=weight), tokens)
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


def held_out_identity_gaps(
    config: PretrainingConfig,
    base: Base,
    dataset: FaceDataset,
    faces: dict[str, PersonFaces],
    pva: PVAModel,
    accelerator: Accelerator,
) -> dict[str, float]:
    """A pretraining run's validation for any PVA model: the mean face-region loss on
    config.validation_samples held-out samples (the val split) with the person's own identity
    tokens, with none, and with another held-out person's (keys own, none, other)."""
    val_people = [p for p in dataset.splits.get("val", ()) if p in faces]
    texts = text_cache_for(Path(config.output_dir), base, dataset, val_people, accelerator)
    with training_mode(), PretrainingSession(base, pva, config, texts) as session:
        held_out = validation_samples(dataset, faces, val_people, config)
        return identity_gaps(
            session,
            PretrainingStep(pva, None),
            held_out,
            config.validation_samples,
            config.batch_size,
            accelerator,
        )


@torch.no_grad()
def preview_grid(
    session: PretrainingSession,
    step_module: PretrainingStep,
    samples: PretrainingSamples,
    count: int,
    steps: int,
) -> torch.Tensor:
    """[H, W, 3] image: per held-out sample a row of masked input | inpainted | original."""
    items = [samples[i] for i in range(count)]
    batch = SampleBatch.of(items)
    prepared = session.prepare(batch, bins=1)
    tokens = step_module.tokens(prepared.references)
    sampling = session.patched.get_model_object("model_sampling")
    sigmas = karras_sigmas(sampling, steps).to(session.device)
    x0 = prepared.training.x0
    known = 1 - face_weight(batch.mask, x0.shape[-2:]).to(x0.device)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = sampling.noise_scaling(sigmas[0].expand(x0.shape[0]), noise, x0, max_denoise=True)
    was_training = step_module.training
    step_module.eval()
    try:
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = session.denoise(prepared.training.conds, x, sigma.expand(x0.shape[0]), tokens)
            denoised = denoised * (1 - known) + x0 * known  # the photo outside the mask, as KSampler keeps it
            x = x + (x - denoised) / sigma * (following - sigma)  # Euler
    finally:
        step_module.train(was_training)
    decoded = session.base.vae.decode(session.patched.model.process_latent_out(x)).float().cpu()
    pixels = batch.pixels.float()
    masked = pixels * (1 - batch.mask[..., None]) + 0.5 * batch.mask[..., None]
    decoded = decoded[:, : pixels.shape[1], : pixels.shape[2]].clamp(0, 1)
    rows = [torch.cat([masked[i], decoded[i], pixels[i]], dim=1) for i in range(len(items))]
    return torch.cat(rows, dim=0)
