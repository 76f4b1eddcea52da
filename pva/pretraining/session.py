"""The frozen base and the pretraining session: what a pretraining step computes, from a batch
of samples to the one loss.

The module DDP wraps (`PretrainingStep`) computes the *whole* loss, the frozen UNet's forward
included, so the hooks that average gradients across processes fire for every trainable
parameter. (Wrapping only the small trainable module while calling the UNet outside it would let
every process train its own copy, silently.) The session is an argument of its forward, not a
submodule: the UNet is frozen, belongs to ComfyUI's model management, and is never synchronized.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import comfy.model_management
import torch

from ..data.datasets import FaceDataset
from ..data.text_cache import TextCache, TextEncoder
from ..errors import PVAError
from ..host.conditioning import inpaint_conditioning_of_latents, masked_for_inpainting
from ..host.loading import is_loaded
from ..method.model import PVAModel
from ..method.patching import is_attached
from ..training.session import TrainingBatch, TrainingSession, face_weight, stratified_sigmas
from .config import PretrainingConfig
from .phases import StepPhases
from .samples import TEMPLATES, References, SampleBatch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import VAE


@dataclass
class Base:
    """The frozen base: a ComfyUI MODEL, its VAE, and the text encoder for captions."""

    model: ModelPatcher
    vae: VAE
    encode_text: TextEncoder
    name: str
    fingerprint: str  # changes with the text encoder (keys the text cache)


def load_base(checkpoint: str | os.PathLike) -> Base:
    """A checkpoint file through ComfyUI's own loader, as Load Checkpoint loads it."""
    from ..host.launch import load_checkpoint

    path = Path(checkpoint)
    model, clip, vae = load_checkpoint(path)
    return _base(model, clip, vae, path.name, [path])


def load_split_base(
    diffusion_model: str | os.PathLike, text_encoders: list, clip_type: str, vae: str | os.PathLike
) -> Base:
    """A base from separate files (a Flux model, its text encoders, its VAE), as ComfyUI's
    Load Diffusion Model, CLIP loaders and Load VAE load them."""
    from ..host.launch import load_split_model

    model, clip, vae_model = load_split_model(diffusion_model, text_encoders, clip_type, vae)
    files = [Path(diffusion_model), *map(Path, text_encoders)]
    return _base(model, clip, vae_model, Path(diffusion_model).name, files)


def _base(model: ModelPatcher, clip, vae: VAE, name: str, files: list[Path]) -> Base:  # noqa: ANN001
    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        ((cond, extra),) = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return cond, extra.get("pooled_output")

    # the text cache is keyed by the files the text encoder came from
    fingerprint = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return Base(model, vae, encode, name, fingerprint)


@dataclass
class PreparedBatch:
    """A batch ready for the loss: each sample at its K noise levels, and its references."""

    training: TrainingBatch  # [B * bins] latents, sample-major
    references: References  # [B, R, ...], on the device
    bins: int


class PretrainingStep(torch.nn.Module):
    """The loss of one micro-batch as a module (what DDP wraps): identity tokens from the
    references (FaceNet first, in stage 2), then the frozen UNet through the session's loss."""

    def __init__(self, pva: PVAModel, facenet: torch.nn.Module | None = None):
        super().__init__()
        self.pva = pva
        self.facenet = facenet

    def tokens(self, references: References) -> torch.Tensor:
        """[B, M, C] identity tokens of each sample's references."""
        embeddings = references.embeddings
        if self.facenet is not None:
            from ..faces.facenet import embed_faces

            crops = references.crops
            embeddings = embed_faces(self.facenet, crops.flatten(0, 1), grad=True).view(*crops.shape[:2], -1)
        return self.pva.identity_encoder(embeddings, references.mask)

    def forward(self, batch: PreparedBatch, session: PretrainingSession) -> torch.Tensor:
        tokens = self.tokens(batch.references).repeat_interleave(batch.bins, dim=0)
        return session.loss(batch.training, tokens)


class PretrainingSession(TrainingSession):
    """The base MODEL prepared for pretraining, and the batches it trains on."""

    def __init__(self, base: Base, pva: PVAModel, config: PretrainingConfig, texts: TextCache):
        # accelerate's autocast (mixed_precision) covers the forward: no autocast of our own
        super().__init__(base.model, pva, config.train, config.gradient_checkpointing, mixed_precision="none")
        self.base, self.config, self.texts = base, config, texts
        self.phases: StepPhases = StepPhases.off()

    def activation_positions(self) -> int:
        side = self.config.samples.resolution // 8
        return self.config.batch_size * self.config.time_bins * side * side

    def training_memory(self) -> int:
        # The VAE encodes every batch while the UNet stays loaded: ask for its room up front, so
        # ComfyUI need not unload the training UNet to make room for it later.
        vae = self.base.vae
        shape = (self.config.batch_size, 3, self.config.samples.resolution, self.config.samples.resolution)
        return super().training_memory() + int(vae.memory_used_encode(shape, vae.vae_dtype))

    def __enter__(self) -> PretrainingSession:
        super().__enter__()
        try:
            comfy.model_management.load_models_gpu([self.patched, self.base.vae.patcher])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def check_still_loaded(self) -> None:
        """ComfyUI may unload a model to make room for another: training on an unpatched UNet
        would learn nothing, silently."""
        if not is_loaded(self.patched) or not is_attached(self.patched, self.pva):
            raise PVAError(
                "ComfyUI unloaded the training UNet to make room for the VAE; lower batch_size or resolution, "
                "or use gradient checkpointing, so that the UNet and the VAE fit on the GPU together."
            )

    @torch.no_grad()
    def prepare(self, batch: SampleBatch, bins: int | None = None) -> PreparedBatch:
        """Everything the loss needs that does not train: ComfyUI's inpainting latents
        (InpaintModelConditioning, the VAE), the cached text conditioning, and each sample's
        K noise levels and noise (from its own seed)."""
        bins, device = bins or self.config.time_bins, self.device
        with self.phases("text"):
            contexts, pooled = self.texts.lookup(batch.captions)
        positive = [[contexts, {} if pooled is None else {"pooled_output": pooled}]]
        with self.phases("vae"):
            latent, masked = self.target_latents(batch)
            self.check_still_loaded()
        cond = positive if masked is None else inpaint_conditioning_of_latents(positive, masked, batch.mask)
        ((context, extra),) = cond

        def each(t: torch.Tensor) -> torch.Tensor:  # sample-major: a sample's K copies side by side
            return t.repeat_interleave(bins, dim=0)

        extra = {k: each(v) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        x0 = self.patched.model.process_latent_in(each(latent).to(device))
        sampling = self.patched.get_model_object("model_sampling")
        sigmas, noise = [], []
        for seed in batch.noise_seeds:
            generator = torch.Generator().manual_seed(seed)
            sigmas.append(stratified_sigmas(sampling, bins, generator))
            noise.append(torch.randn((bins, *x0.shape[1:]), generator=generator))
        with self.phases("conditioning"):
            conds = self.model_conds([[each(context), extra]], x0, x0.shape[0])
        training = TrainingBatch(
            conds=conds,
            x0=x0,
            sigmas=torch.cat(sigmas).to(device),
            noise=torch.cat(noise).to(device),
            keep=each(batch.keep.to(device)),
            # a regular (non-inpainting) model learns the masked region only
            face_weight=face_weight(batch.mask, x0.shape[-2:], bins).to(device) if self.masked_loss else None,
        )
        return PreparedBatch(training, batch.references.to(device), bins)

    def target_latents(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The VAE's latents of the targets and (inpainting models) of the targets with their masks
        painted grey, as InpaintModelConditioning makes them: from the latent cache where a sample
        has them, else from its pixels."""
        vae, inpainting = self.base.vae, not self.masked_loss
        missing = torch.ones(len(batch.captions), dtype=torch.bool) if batch.cached is None else ~batch.cached
        latent, masked = batch.latents, batch.masked if inpainting else None
        if missing.any():
            pixels, mask = batch.pixels[missing], batch.mask[missing]
            encoded = vae.encode(pixels).float().cpu()
            latent = encoded if latent is None else latent.index_put((missing,), encoded)
            if inpainting:
                encoded = vae.encode(masked_for_inpainting(pixels, mask)).float().cpu()
                masked = encoded if masked is None else masked.index_put((missing,), encoded)
        return latent, masked


def text_cache_for(
    output_dir: Path, base: Base, dataset: FaceDataset, people: list[str], accelerator: Accelerator
) -> TextCache:
    """Every caption the people's samples can have, encoded once (by the main process)."""
    captions = set(TEMPLATES)
    for name in people:
        captions |= {f"photo of a person, {p.caption}" for p in dataset.people[name].photos if p.caption}
    path = output_dir / f"text-{hashlib.sha256(base.fingerprint.encode()).hexdigest()[:12]}.safetensors"
    with accelerator.main_process_first():  # the main process encodes, the others then read
        if accelerator.is_main_process:
            return TextCache.build(path, captions, base.encode_text)
    return TextCache(path)
