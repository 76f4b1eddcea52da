"""Pretraining settings (kept apart from pva.pretraining, which needs ComfyUI imported: a
launcher reads these before it chooses the device)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PVAError
from ..method.model import TRAINABLE
from .samples import SampleSettings


@dataclass
class PretrainingConfig:
    output_dir: Path
    max_steps: int = 50_000
    batch_size: int = 2  # targets per process and micro-batch
    gradient_accumulation: int = 4
    time_bins: int = 4  # each target at one noise level from each of K bins, in one forward
    learning_rate: float = 1e-6  # projections (and FaceNet in stage 2)
    scale_lr: bool = True  # x total batch (batch x accumulation x processes), as the research code
    encoder_learning_rate: float = 3.2e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA; e.g. 0.999: the exported weights are the moving average
    stage: int = 1  # 2: also fine-tune FaceNet
    train: str = "both"  # identity_encoder, projections or both
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    validate_every: int = 1000
    validation_samples: int = 16
    preview_samples: int = 4  # rows of the validation image grid (0: no grid)
    preview_steps: int = 20  # sampling steps of the grid
    num_tokens: int = 10
    encoder_depth: int = 4
    encoder_heads: int = 8
    encoder_dropout: float = 0.1
    seed: int = 0
    loader_workers: int = 2
    samples: SampleSettings = field(default_factory=SampleSettings)
    # "cached": each photo's views and masks encoded by the VAE once (latent_cache.py); "per-step":
    # a fresh crop and mask through the VAE for every sample (augmentations that need pixels)
    latents: str = "cached"
    latent_views: int = 2  # crops per photo, each at its own context
    latent_masks: int = 4  # masks per crop
    latents_dir: Path | None = None  # default: <face cache>/latents

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, f"max_steps: must be at least 1, got {self.max_steps}."),
            (self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}."),
            (self.gradient_accumulation >= 1, "gradient_accumulation: must be at least 1."),
            (1 <= self.time_bins <= 1000, f"time_bins: must be 1..1000, got {self.time_bins}."),
            (self.learning_rate > 0 and self.encoder_learning_rate > 0, "learning rates must be > 0."),
            (self.stage in (1, 2), f"stage: 1 or 2, got {self.stage}."),
            (self.train in TRAINABLE, f"train: must be one of {TRAINABLE}, got {self.train!r}."),
            (0 <= self.ema_decay < 1, f"ema_decay: must be in [0, 1), got {self.ema_decay}."),
            (
                self.checkpoint_every >= 1 and self.validate_every >= 1,
                "checkpoint/validate every: at least 1.",
            ),
            (
                self.latents in ("cached", "per-step"),
                f"latents: 'cached' or 'per-step', got {self.latents!r}.",
            ),
            (
                self.latent_views >= 1 and self.latent_masks >= 1,
                f"latent views and masks: at least 1 each, got {self.latent_views} and {self.latent_masks}.",
            ),
            (
                self.samples.resolution % 8 == 0,
                f"resolution: a multiple of 8, got {self.samples.resolution}.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PVAError(message)

    def total_batch(self, processes: int) -> int:
        return self.batch_size * self.gradient_accumulation * processes
