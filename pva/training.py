"""Quick personalization: fine-tune a PVA model on one person's photos in ~40 steps.

Runs the denoising loss through the real ComfyUI model (its model management, its inpaint
conditioning, its cond batching) with only the PVA parameters trainable. The base model is
frozen and left exactly as it was, also when ComfyUI interrupts the run.
"""

import copy
import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import torch
import torch.utils.checkpoint

from .errors import PVAError
from .model import TRAINABLE, PVAModel
from .patching import apply_identity, check_compatible
from .training_data import PersonalizationData

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import VAE

# Memory a training step needs for the backward pass, per sample and latent position at 4 bytes
# per value, without / with gradient checkpointing. The SD1.5-inpainting UNet saves 529 / 38 KiB
# (autograd's saved tensors, fp32, 256 px, 4 time bins); the rest is headroom for the backward's
# transient buffers and, with checkpointing, the layer being recomputed.
ACTIVATION_BYTES_PER_POSITION = {False: 800 * 2**10, True: 192 * 2**10}


@dataclass
class TrainingSettings:
    steps: int = 40
    learning_rate: float = 1e-4
    batch_size: int = 1  # targets per optimizer step (gradients accumulated)
    time_bins: int = 4  # K: each target is used at one timestep from each of K bins
    seed: int = 0
    train: str = "both"
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA when supported; "none"

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps: must be at least 1, got {self.steps}."),
            (self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}."),
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


def encode_inpaint_targets(
    data: PersonalizationData, vae: "VAE", positive: list
) -> list[tuple[list, torch.Tensor]]:
    """(conditioning, clean latent) per target, from ComfyUI's own InpaintModelConditioning."""
    import nodes  # ComfyUI's core nodes module (the host's, not this pack's nodes/)

    inpaint = nodes.InpaintModelConditioning()
    targets = []
    with torch.no_grad():
        for i in range(data.count):
            pixels, mask = data.pixels[i : i + 1], data.masks[i : i + 1]
            cond, _, latent = inpaint.encode(positive, positive, pixels, vae, mask, noise_mask=True)
            targets.append((cond, latent["samples"]))
    return targets


def stratified_sigmas(sampling, bins: int, generator: torch.Generator, groups: int = 1) -> torch.Tensor:  # noqa: ANN001
    """Time-stratified noise levels: for each of `groups` samples, one timestep from each of `bins`
    equal bins of the model's training schedule, [groups * bins] sample-major.

    Drawn from the schedule's own sigma table in timestep order, so discrete (SD) schedules and
    the continuous EDM / v ones (e.g. Playground v2.5, CosXL) alike get valid noise levels."""
    table = sampling.sigmas
    offsets = torch.rand(groups * bins, generator=generator)
    steps = ((torch.arange(bins).repeat(groups) + offsets) * (table.shape[0] / bins)).long()
    return table[steps.clamp(max=table.shape[0] - 1).to(table.device)]


class TrainingSession:
    """A MODEL prepared for training PVA parameters, and the one denoising loss that quick
    personalization and pretraining share. Use as a context manager: entering loads the
    model (ComfyUI's model management) and freezes its weights, leaving restores it whatever
    happened.

    The loss runs through ComfyUI's own code path: its inpaint conditioning (process_conds), its
    cond batching (calc_cond_batch with the MODEL's model_options, so attention patches and
    wrappers act as in sampling), and its noise scaling."""

    def __init__(
        self,
        model_patcher: "ModelPatcher",
        pva: PVAModel,
        train: str = "both",
        gradient_checkpointing: bool = False,
        mixed_precision: str = "auto",
    ):
        check_compatible(pva, model_patcher)
        # An inpainting model gets the paper's whole-latent loss; a regular model learns the face region only.
        self.masked_loss = model_patcher.model.model_config.unet_config.get("in_channels", 4) <= 4
        self.pva = pva
        self.train_which = train
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = mixed_precision
        placeholder = torch.zeros(1, pva.num_tokens, pva.context_dim)
        self.patched = apply_identity(model_patcher, pva, placeholder, scope="both")
        self.stream = self.patched.get_model_object(f"diffusion_model.{pva.layers[0].name}").pva_streams[-1]
        self._restore: list[Callable[[], None]] = []

    # -- memory ---------------------------------------------------------------------------------
    def activation_positions(self) -> int:
        """Latent positions one forward pass trains on (batch x height x width)."""
        raise NotImplementedError

    def activation_memory(self) -> int:
        """Estimated bytes of what a training step keeps for the backward pass."""
        per_position = ACTIVATION_BYTES_PER_POSITION[self.gradient_checkpointing]
        model = self.patched.model
        dtype = model.manual_cast_dtype or model.get_dtype()
        bytes_per_value = 2 if self._uses_bf16() else comfy.model_management.dtype_size(dtype)
        return int(self.activation_positions() * per_position * bytes_per_value / 4)

    def training_memory(self) -> int:
        """Bytes the run needs on the device besides the UNet's weights: activations, the PVA
        model, and for its trained (fp32) parameters their gradients and AdamW's two moments."""
        trainable = sum(p.numel() for module in self._trained_modules() for p in module.parameters())
        frozen = sum(p.numel() for p in self.pva.parameters()) - trainable
        return self.activation_memory() + 16 * trainable + 4 * frozen

    # -- entering and leaving ---------------------------------------------------------------
    def __enter__(self) -> "TrainingSession":
        try:
            # ComfyUI frees other models for the training activations and, when VRAM is still
            # short, loads the UNet partially (weights streamed per layer; gradients unchanged).
            comfy.model_management.load_models_gpu([self.patched], memory_required=self.training_memory())
            self.patched.pre_run()  # what ComfyUI's sampler does before running the model
            self._restore.append(self.patched.cleanup)
            self.device = self.patched.load_device
            diffusion_model = self.patched.model.diffusion_model
            self._freeze_base(diffusion_model)
            if self.gradient_checkpointing:
                self._checkpoint_blocks(diffusion_model)
            self.pva.to(self.device).train()
            self._set_trainable()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self.pva.to("cpu").eval().requires_grad_(False)
        self.stream.set_training_batch(self.stream.tokens.detach().cpu())
        _unload(self.patched)
        comfy.model_management.soft_empty_cache()

    def _freeze_base(self, module: torch.nn.Module) -> None:
        """No gradients for the base weights. Weights created under ComfyUI's inference mode
        are swapped for normal tensors sharing their memory (autograd cannot save inference
        tensors; an alias costs nothing, a copy would double the UNet's memory), and the
        originals put back afterwards."""
        swapped = []
        for sub in module.modules():
            for name, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
                if tensor is None:
                    continue
                if tensor.is_inference():
                    is_param = name in sub._parameters
                    alias = _normal_alias(tensor)
                    (sub._parameters if is_param else sub._buffers)[name] = (
                        torch.nn.Parameter(alias, requires_grad=False) if is_param else alias
                    )
                    swapped.append((sub, name, tensor, is_param))
                elif name in sub._parameters and tensor.requires_grad:
                    tensor.requires_grad_(False)
                    swapped.append((sub, name, None, True))

        def undo() -> None:
            for sub, name, original, is_param in swapped:
                if original is None:
                    sub._parameters[name].requires_grad_(True)
                else:
                    (sub._parameters if is_param else sub._buffers)[name] = original

        self._restore.append(undo)

    def _checkpoint_blocks(self, diffusion_model: torch.nn.Module) -> None:
        """Recompute each UNet layer in the backward pass instead of storing its activations.

        ComfyUI's UNet calls the layers inside each block directly (forward_timestep_embed),
        so the layers, not the blocks, get the checkpointed forward."""
        blocks = (
            list(diffusion_model.input_blocks)
            + [diffusion_model.middle_block]
            + list(diffusion_model.output_blocks)
        )
        layers = [layer for block in blocks for layer in block]
        for layer in layers:

            def checkpointed(*args, _forward: Callable = layer.forward, **kwargs):  # noqa: ANN002, ANN003, ANN202
                # ComfyUI updates transformer_options (block, block_index) in place as the
                # forward proceeds: the recomputation must see them as they were now.
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = checkpointed
        self._restore.append(lambda: [layer.__dict__.pop("forward", None) for layer in layers])

    def _trained_modules(self) -> list[torch.nn.Module]:
        modules = []
        if self.train_which in ("both", "identity_encoder"):
            modules.append(self.pva.identity_encoder)
        if self.train_which in ("both", "projections"):
            modules.append(self.pva.projections)
        return modules

    def _set_trainable(self) -> None:
        self.pva.requires_grad_(False)
        for module in self._trained_modules():
            module.requires_grad_(True)
        self.parameters = [p for p in self.pva.parameters() if p.requires_grad]

    # -- the loss ---------------------------------------------------------------------------
    def model_conds(self, cond: list, latent: torch.Tensor, batch: int) -> list:
        """ComfyUI's own processing of a conditioning (inpaint concat etc.) for a batch of
        `batch` noisy latents of `latent`'s (model-space) shape."""
        noise = torch.zeros((batch,) + tuple(latent.shape[1:]), device=self.device)
        processed = comfy.samplers.process_conds(
            self.patched.model,
            noise,
            {"positive": comfy.sampler_helpers.convert_cond(cond)},
            self.device,
            latent_image=latent,
            denoise_mask=None,
            seed=0,
        )
        return processed["positive"]

    def loss(
        self,
        conds: list,
        x0: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        tokens: torch.Tensor,
        keep: torch.Tensor | None = None,
        face_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoising loss of PVA: noise-prediction MSE of the MODEL with `tokens` as the
        identity ([1 or N, M, C]; `keep` drops it per sample), over the whole latent, or
        weighted by `face_weight` ([N or 1, 1, h, w]) to learn one region only.

        x0, noise: [N, C, h, w] clean (model-space) latents and their noise; sigmas: [N]."""
        sampling = self.patched.get_model_object("model_sampling")
        x_t = sampling.noise_scaling(sigmas, noise, x0)
        denoised = self.denoise(conds, x_t, sigmas, tokens, keep)
        # for noise-scaled models x_t = x0 + sigma * noise, so the predicted noise is
        # (x_t - denoised) / sigma and its error is (x0 - denoised) / sigma
        error = (denoised.float() - x0.float()) / sigmas.float().view(-1, 1, 1, 1)
        if face_weight is not None:
            weight = face_weight.to(error.device, error.dtype).expand(error.shape[0], 1, *error.shape[2:])
            return (error.pow(2) * weight).sum() / (weight.sum() * error.shape[1]).clamp(min=1)
        return error.pow(2).mean()

    def denoise(
        self,
        conds: list,
        x_t: torch.Tensor,
        sigmas: torch.Tensor,
        tokens: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MODEL's denoised prediction of noisy latents x_t at noise levels `sigmas`."""
        self.stream.set_training_batch(tokens, keep)
        with self._autocast():
            return comfy.samplers.calc_cond_batch(
                self.patched.model, [conds], x_t, sigmas, self.patched.model_options
            )[0]

    def _uses_bf16(self) -> bool:
        return (
            self.mixed_precision == "auto"
            and self.patched.load_device.type == "cuda"
            and torch.cuda.is_bf16_supported(including_emulation=False)  # not on T4/V100/RTX 20xx
        )

    def _autocast(self):  # noqa: ANN202
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._uses_bf16() else nullcontext()


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
    ):
        settings.validate()
        super().__init__(
            model_patcher, pva, settings.train, settings.gradient_checkpointing, settings.mixed_precision
        )
        self.settings = settings
        self.data = data
        self.targets = targets

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
        self, target: int, generator: torch.Generator, face_only: bool | None = None
    ) -> torch.Tensor:
        """Denoising loss of one target at K stratified noise levels (time-stratified
        resampling), over the face region only when `face_only` (default: only for a
        regular, non-inpainting model)."""
        bins = self.settings.time_bins
        sampling = self.patched.get_model_object("model_sampling")
        sigmas = stratified_sigmas(sampling, bins, generator).to(self.device)
        x0 = self.latents[target].expand(bins, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        tokens = self.pva.identity_encoder(self.data.references_for(target).to(self.device))
        face_only = self.masked_loss if face_only is None else face_only
        weight = None
        if face_only:
            weight = torch.nn.functional.interpolate(
                self.data.masks[target][None, None].to(self.device), x0.shape[-2:]
            )
        return self.loss(self.conds[target], x0, sigmas, noise, tokens, face_weight=weight)

    def train(self, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        settings = self.settings
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, weight_decay=1e-2)
        losses = []
        for step in range(settings.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(settings.batch_size):
                target = (step * settings.batch_size + j) % self.data.count  # rotate the references
                loss = self.target_loss(target, generator) / settings.batch_size
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
        self, target: int, seed: int = 1234, repeats: int = 2, face_only: bool | None = None
    ) -> float:
        """Loss on fixed noise and timesteps (no dropout), to measure what training did."""
        self.pva.eval()
        try:
            generator = torch.Generator().manual_seed(seed)
            return (
                sum(self.target_loss(target, generator, face_only).item() for _ in range(repeats)) / repeats
            )
        finally:
            self.pva.train()


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over an inference tensor's memory (the base weights are only read).
    Tensor subclasses that keep their data elsewhere (quantized formats) are copied instead."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.clone()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


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


def _unload(patcher: "ModelPatcher") -> None:
    """Take the training clone out of ComfyUI's loaded models, restoring the original modules."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model is patcher:
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)
            return
    patcher.unpatch_model()  # patched but never registered (loading failed half-way)


@contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on, even inside ComfyUI's inference-mode executor."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def personalize(
    model_patcher: "ModelPatcher",
    vae: "VAE",
    positive: list,
    data: PersonalizationData,
    pva: PVAModel,
    settings: TrainingSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train a copy of `pva` on `data`; the input PVA model and the MODEL are left unchanged."""
    check_latent_format(model_patcher, vae)
    with training_mode(), torch.random.fork_rng(devices=[]):
        trained = copy.deepcopy(pva)  # PVA models are built and loaded as normal tensors
        trained.instance_id = uuid.uuid4().hex
        torch.manual_seed(settings.seed)  # dropout in the identity encoder
        targets = encode_inpaint_targets(data, vae, positive)
        with Personalizer(model_patcher, trained, data, targets, settings) as run:
            losses = run.train(on_step)
    trained.provenance = dict(
        pva.provenance,
        personalized=dict(
            steps=settings.steps,
            learning_rate=settings.learning_rate,
            time_bins=settings.time_bins,
            batch_size=settings.batch_size,
            seed=settings.seed,
            train=settings.train,
            references=data.count,
            final_loss=losses[-1],
        ),
    )
    return TrainingResult(trained, losses)
