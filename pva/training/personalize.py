"""Quick personalization: fine-tune a PVA model on one person's photos in ~40 steps, each
reference in turn the target, the others (or its mirror image) its references, with the training
session's one loss and only the PVA parameters trainable."""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import comfy.model_management
import torch

from ..errors import PVAError
from ..host.conditioning import inpaint_conditioning
from ..host.text import replace_text
from ..method.model import TRAINABLE as PVA_TRAINABLE
from ..method.model import PVAModel
from .data import PersonalizationData
from .person_prompt import TokenPrompt
from .session import TrainingBatch, TrainingSession, face_weight, stratified_sigmas, training_mode

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import VAE


# What a personalization may train: PVA's parameters, or only the person token with the identity
# path off (textual inversion: the bench's control, not offered by the node).
TOKEN_ONLY = "person token only"
TRAINABLE = (*PVA_TRAINABLE, TOKEN_ONLY)


@dataclass
class TrainingSettings:
    steps: int = 40
    learning_rate: float = 1e-4  # W'q/W'k/W'v, and the identity encoder unless encoder_learning_rate is set
    encoder_learning_rate: float | None = None
    # the person token, when one trains: measured by bench/personalization_from_scratch.py
    token_learning_rate: float = 2e-2
    batch_size: int = 1  # targets per optimizer step (gradients accumulated)
    time_bins: int = 4  # K: each target is used at one timestep from each of K bins
    seed: int = 0
    train: str = "both"
    mirror: bool = False  # each photo's mirror image trains too (flip augmentation)
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA when supported; "none"

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps: must be at least 1, got {self.steps}."),
            (self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}."),
            (
                self.encoder_learning_rate is None or self.encoder_learning_rate > 0,
                f"encoder_learning_rate: must be > 0, got {self.encoder_learning_rate}.",
            ),
            (
                self.token_learning_rate > 0,
                f"token_learning_rate: must be > 0, got {self.token_learning_rate}.",
            ),
            (self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}."),
            (1 <= self.time_bins <= 1000, f"time_bins: must be 1..1000, got {self.time_bins}."),
            (self.train in TRAINABLE, f"train: must be one of {TRAINABLE}, got {self.train!r}."),
            (
                self.mixed_precision in ("auto", "none"),
                f"mixed_precision: 'auto' or 'none', got {self.mixed_precision!r}.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PVAError(message)


@dataclass
class TrainingResult:
    pva: PVAModel
    losses: list[float] = field(default_factory=list)


def check_latent_format(model_patcher: "ModelPatcher", vae: "VAE") -> None:
    """A VAE whose latents the MODEL cannot read would fail deep inside the UNet."""
    model_channels = model_patcher.model.latent_format.latent_channels
    vae_channels = getattr(vae, "latent_channels", model_channels)
    if vae_channels != model_channels:
        family = type(model_patcher.model.model_config).__name__
        raise PVAError(
            f"vae: it makes {vae_channels}-channel latents but the MODEL ({family}) works on {model_channels}-channel "
            "latents. Connect the VAE that belongs to this checkpoint."
        )


def training_data(data: PersonalizationData, settings: TrainingSettings) -> PersonalizationData:
    """The targets a run trains on: the photos, and their mirror images when `mirror`."""
    return data.with_mirrored_targets() if settings.mirror else data


def encode_inpaint_targets(
    data: PersonalizationData, vae: "VAE", positive: list
) -> list[tuple[list, torch.Tensor]]:
    """(conditioning, clean latent) per target, from ComfyUI's own InpaintModelConditioning."""
    targets = []
    with torch.no_grad():
        for i in range(data.count):
            pixels, mask = data.pixels[i : i + 1], data.masks[i : i + 1]
            cond, _, latent = inpaint_conditioning(positive, positive, pixels, vae, mask)
            targets.append((cond, latent["samples"]))
    return targets


class Personalizer(TrainingSession):
    """One quick-personalization run: each reference in turn is the target, the others (or its
    mirror image) its references."""

    def __init__(
        self,
        model_patcher: "ModelPatcher",
        pva: PVAModel,
        data: PersonalizationData,
        targets: list,
        settings: TrainingSettings,
        prompt: TokenPrompt | None = None,
    ):
        settings.validate()
        if settings.train == TOKEN_ONLY and prompt is None:
            raise PVAError(
                f"train {TOKEN_ONLY!r}: give a prompt with the person token; there is nothing else to train."
            )
        super().__init__(
            model_patcher,
            pva,
            settings.train,
            settings.gradient_checkpointing,
            settings.mixed_precision,
            prompt,
        )
        self.settings = settings
        self.data = data
        self.targets = targets
        self.identity = settings.train != TOKEN_ONLY  # the identity path in the loss

    def activation_positions(self) -> int:
        _, latent = self.targets[0]
        return self.settings.time_bins * latent.shape[-2] * latent.shape[-1]

    def __enter__(self) -> "Personalizer":
        super().__enter__()
        try:
            self.targets = [(_plain(cond), _plain(latent)) for cond, latent in self.targets]
            # clean latents in the model's own latent space, once for the whole run
            self.latents = [
                self.patched.model.process_latent_in(latent.to(self.device)) for _, latent in self.targets
            ]
            self.conds = [
                self.model_conds(cond, latent, self.settings.time_bins)
                for (cond, _), latent in zip(self.targets, self.latents, strict=True)
            ]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def target_loss(
        self, target: int, generator: torch.Generator, face_only: bool | None = None, identity: bool = True
    ) -> torch.Tensor:
        """Denoising loss of one target at K stratified noise levels (time-stratified
        resampling), over the face region only when `face_only` (default: only for a
        regular, non-inpainting model); without `identity` every latent drops the identity (the
        path of identity dropout): the base model's loss, measured through the same path."""
        bins = self.settings.time_bins
        sampling = self.patched.get_model_object("model_sampling")
        sigmas = stratified_sigmas(sampling, bins, generator).to(self.device)
        x0 = self.latents[target].expand(bins, -1, -1, -1)
        conds = self.conds[target]
        if self.prompt is not None:  # the text changes with the person token at every step
            cond = replace_text(self.targets[target][0], self.prompt.encode())
            conds = self.model_conds(cond, self.latents[target], bins)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        tokens = self.pva.identity_encoder(self.data.references_for(target).to(self.device))
        face_only = self.masked_loss if face_only is None else face_only
        weight = (
            face_weight(self.data.masks[target][None].to(self.device), x0.shape[-2:]) if face_only else None
        )
        keep = None if identity else torch.zeros(bins, dtype=torch.bool)
        return self.loss(TrainingBatch(conds, x0, sigmas, noise, keep=keep, face_weight=weight), tokens)

    def optimizer_groups(self) -> list[dict]:
        """AdamW groups: each trained part at its own learning rate; no weight decay on the
        person token (it would pull the word towards zero, away from the text embeddings)."""
        settings = self.settings
        rates = {
            "projections": settings.learning_rate,
            "identity_encoder": settings.encoder_learning_rate or settings.learning_rate,
            "person_token": settings.token_learning_rate,
        }
        return [
            {
                "params": params,
                "lr": rates[group],
                **({"weight_decay": 0.0} if group == "person_token" else {}),
            }
            for group, params in self.parameter_groups.items()
        ]

    def train(self, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        settings = self.settings
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = torch.optim.AdamW(self.optimizer_groups(), weight_decay=1e-2)
        losses = []
        for step in range(settings.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(settings.batch_size):
                target = (step * settings.batch_size + j) % self.data.count  # rotate the references
                loss = self.target_loss(target, generator, identity=self.identity) / settings.batch_size
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise PVAError(
                    f"personalization diverged at step {step + 1} (loss {total}); lower the learning_rate."
                )
            optimizer.step()
            losses.append(total)
            if on_step:
                on_step(step, total)
        del optimizer
        return losses

    @torch.no_grad()
    def held_out_loss(
        self,
        target: int,
        seed: int = 1234,
        repeats: int = 2,
        face_only: bool | None = None,
        identity: bool = True,
    ) -> float:
        """Loss on fixed noise and timesteps (no dropout), to measure what training did."""
        self.pva.eval()
        try:
            generator = torch.Generator().manual_seed(seed)
            return (
                sum(self.target_loss(target, generator, face_only, identity).item() for _ in range(repeats))
                / repeats
            )
        finally:
            self.pva.train()


def _plain(value):  # noqa: ANN001, ANN202
    """Normal (non-inference) copies of tensors made by ComfyUI's inference-mode executor."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def personalize(
    model_patcher: "ModelPatcher",
    vae: "VAE",
    positive: list,
    data: PersonalizationData,
    pva: PVAModel,
    settings: TrainingSettings,
    on_step: Callable[[int, float], None] | None = None,
    prompt: TokenPrompt | None = None,
) -> TrainingResult:
    """Train a copy of `pva` on `data`; the input PVA model and the MODEL are left unchanged.
    With a `prompt` its person token trains too (it replaces `positive`) and the copy carries it."""
    check_latent_format(model_patcher, vae)
    with training_mode(), torch.random.fork_rng(devices=[]):
        trained = copy.deepcopy(pva)  # PVA models are built and loaded as normal tensors
        if prompt is not None:
            trained.person_token = copy.deepcopy(prompt.token)
            prompt = prompt.with_token(trained.person_token)
            with torch.no_grad():
                positive = prompt.encode()
        torch.manual_seed(settings.seed)  # dropout in the identity encoder
        data = training_data(data, settings)
        targets = encode_inpaint_targets(data, vae, positive)
        with Personalizer(model_patcher, trained, data, targets, settings, prompt) as run:
            losses = run.train(on_step)
    trained.provenance = dict(
        pva.provenance,
        personalized=dict(
            steps=settings.steps,
            learning_rate=settings.learning_rate,
            **(
                {"encoder_learning_rate": settings.encoder_learning_rate}
                if settings.encoder_learning_rate
                else {}
            ),
            **(
                {"person_token": prompt.token.name, "token_learning_rate": settings.token_learning_rate}
                if prompt is not None
                else {}
            ),
            time_bins=settings.time_bins,
            batch_size=settings.batch_size,
            seed=settings.seed,
            train=settings.train,
            **({"mirror": True} if settings.mirror else {}),
            references=data.photos,
            final_loss=losses[-1],
        ),
    )
    return TrainingResult(trained, losses)
