"""The training session: a MODEL prepared for training PVA parameters, and the one denoising
loss that quick personalization and pretraining share.

The loss runs through ComfyUI's own code path: its inpaint conditioning, its cond batching (with
the MODEL's model_options, so attention patches and wrappers act as in sampling), and its noise
scaling. The session attaches an identity stream of its own to the MODEL and feeds it the
identity tokens of each batch. The base model is frozen and left exactly as it was, also when
ComfyUI interrupts the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import comfy.model_management
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..errors import PVAError
from ..host.conditioning import denoised, model_conds
from ..host.loading import unload
from ..host.mmdit import differentiable_residuals, joint_blocks, transformer_blocks
from ..host.models import has_image_latents, is_inpainting_model
from ..host.text import differentiable
from ..method.model import PVAModel
from ..method.patching import attach, check_compatible, identity_stream

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

    from .person_prompt import TokenPrompt

# Memory a training step needs for the backward pass, per sample and latent position at 4 bytes
# per value, without / with gradient checkpointing. The SD1.5-inpainting UNet saves 529 / 38 KiB
# (autograd's saved tensors, fp32, 256 px, 4 time bins); the rest is headroom for the backward's
# transient buffers and, with checkpointing, the layer being recomputed.
ACTIVATION_BYTES_PER_POSITION = {False: 800 * 2**10, True: 192 * 2**10}


@dataclass
class TrainingBatch:
    """What the denoising loss needs for N noisy latents (each target at its K noise levels,
    sample-major)."""

    conds: list  # ComfyUI's processed conds of the N latents (TrainingSession.model_conds)
    x0: torch.Tensor  # [N, C, h, w] clean latents, model space
    sigmas: torch.Tensor  # [N] noise levels
    noise: torch.Tensor  # [N, C, h, w]
    keep: torch.Tensor | None = None  # [N] bool: which latents see the identity (dropout); None: all
    face_weight: torch.Tensor | None = None  # [N or 1, 1, h, w]: learn this region only; None: all


def face_weight(masks: torch.Tensor, size: tuple[int, int], repeats: int = 1) -> torch.Tensor:
    """Inpainting masks [B, H, W] at the latent size, each repeated for its noise levels:
    [B * repeats, 1, h, w] (the loss weight of a face-only loss, and validation's)."""
    weight = F.interpolate(masks[:, None].float(), size)
    return weight.repeat_interleave(repeats, dim=0) if repeats > 1 else weight


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
    """A MODEL prepared for training PVA parameters, and the one denoising loss. Use as a context
    manager: entering loads the model (ComfyUI's model management) and freezes its weights,
    leaving restores it whatever happened."""

    def __init__(
        self,
        model_patcher: ModelPatcher,
        pva: PVAModel,
        train: str = "both",
        gradient_checkpointing: bool = False,
        mixed_precision: str = "auto",
        prompt: TokenPrompt | None = None,
    ):
        check_compatible(pva, model_patcher)
        if not has_image_latents(model_patcher):
            raise PVAError(
                f"model: training on {type(model_patcher.model.model_config).__name__} is not supported yet (its "
                "latents are video-style [B, C, T, H, W]); Apply PVA Identity works on it with a PVA model trained elsewhere."
            )
        self.prompt = prompt  # when given, the person token trains through the text encoder
        # An inpainting model gets the paper's whole-latent loss; a regular model learns the face region only.
        self.masked_loss = not is_inpainting_model(model_patcher)
        self.pva = pva
        self.train_which = train
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = mixed_precision
        # The session's own identity, on both CFG branches; each forward sets its tokens.
        placeholder = torch.zeros(1, pva.num_tokens, pva.context_dim)
        self.stream = identity_stream(model_patcher, pva, placeholder, scope="both")
        self.patched = attach(model_patcher, self.stream)
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
        trainable = sum(p.numel() for _, module in self._trained_modules() for p in module.parameters())
        frozen = sum(p.numel() for p in self.pva.parameters()) - trainable
        return self.activation_memory() + 16 * trainable + 4 * frozen

    # -- entering and leaving ---------------------------------------------------------------
    def __enter__(self) -> TrainingSession:
        try:
            # ComfyUI frees other models for the training activations and, when VRAM is still
            # short, loads the UNet partially (weights streamed per layer; gradients unchanged).
            # The text encoder is loaded with it: loading it later could evict the UNet.
            text = [self.prompt.clip.patcher] if self.prompt is not None else []
            comfy.model_management.load_models_gpu(
                [self.patched, *text], memory_required=self.training_memory()
            )
            self.patched.pre_run()  # what ComfyUI's sampler does before running the model
            self._restore.append(self.patched.cleanup)
            self.device = self.patched.load_device
            diffusion_model = self.patched.model.diffusion_model
            self._freeze_base(diffusion_model)
            if self.prompt is not None:
                self._freeze_base(self.prompt.clip.cond_stage_model)
                text_encoder = ExitStack()
                text_encoder.enter_context(differentiable(self.prompt.clip))
                self._restore.append(text_encoder.close)
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
        unload(self.patched)
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
        """Recompute each UNet layer (each DiT block) in the backward pass instead of storing
        its activations.

        ComfyUI's UNet calls the layers inside each block directly (forward_timestep_embed),
        so the layers, not the blocks, get the checkpointed forward. A DiT's blocks update their
        inputs in place, so the recomputation is given copies (the originals stay as saved)."""
        dit = bool(joint_blocks(diffusion_model))
        if dit:
            layers = transformer_blocks(diffusion_model)
        else:
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
                run = _on_copies(_forward, diffusion_model) if dit else _forward
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

            layer.forward = checkpointed
        self._restore.append(lambda: [layer.__dict__.pop("forward", None) for layer in layers])

    def _trained_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(group, module) of what trains: 'identity_encoder', 'projections', 'person_token'."""
        modules = []
        if self.train_which in ("both", "identity_encoder"):
            modules.append(("identity_encoder", self.pva.identity_encoder))
        if self.train_which in ("both", "projections"):
            modules.append(("projections", self.pva.projections))
        if self.prompt is not None:
            modules.append(("person_token", self.prompt.token))
        return modules

    def _set_trainable(self) -> None:
        self.pva.requires_grad_(False)
        for _, module in self._trained_modules():
            module.requires_grad_(True)
        self.parameters = [p for p in self.pva.parameters() if p.requires_grad]
        self.parameter_groups = {
            group: [p for p in module.parameters() if p.requires_grad]
            for group, module in self._trained_modules()
        }

    # -- the loss ---------------------------------------------------------------------------
    def model_conds(self, cond: list, latent: torch.Tensor, batch: int) -> list:
        """ComfyUI's own processing of a conditioning (inpaint concat etc.) for a batch of
        `batch` noisy latents of `latent`'s (model-space) shape."""
        return model_conds(self.patched.model, cond, latent, batch, self.device)

    def loss(self, batch: TrainingBatch, tokens: torch.Tensor) -> torch.Tensor:
        """The denoising loss of PVA: noise-prediction MSE of the MODEL with `tokens` as the
        identity ([1 or N, M, C]; batch.keep drops it per latent), over the whole latent, or
        weighted by batch.face_weight to learn one region only."""
        sampling = self.patched.get_model_object("model_sampling")
        x_t = sampling.noise_scaling(batch.sigmas, batch.noise, batch.x0)
        prediction = self.denoise(batch.conds, x_t, batch.sigmas, tokens, batch.keep)
        # for noise-scaled models x_t = x0 + sigma * noise, so the predicted noise is
        # (x_t - denoised) / sigma and its error is (x0 - denoised) / sigma
        error = (prediction.float() - batch.x0.float()) / batch.sigmas.float().view(-1, 1, 1, 1)
        if batch.face_weight is not None:
            weight = batch.face_weight.to(error.device, error.dtype).expand(
                error.shape[0], 1, *error.shape[2:]
            )
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
        with self._autocast(), differentiable_residuals(self.patched.model.diffusion_model):
            return denoised(self.patched.model, conds, x_t, sigmas, self.patched.model_options)

    def _uses_bf16(self) -> bool:
        return (
            self.mixed_precision == "auto"
            and self.patched.load_device.type == "cuda"
            and torch.cuda.is_bf16_supported(including_emulation=False)  # not on T4/V100/RTX 20xx
        )

    def _autocast(self):  # noqa: ANN202
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._uses_bf16() else nullcontext()


def _on_copies(forward: Callable, diffusion_model: torch.nn.Module) -> Callable:
    """A DiT block's `forward` given copies of its tensor arguments (which it changes in place),
    and, in the first run and the recomputation alike, its in-place residual updates made safe."""

    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with differentiable_residuals(diffusion_model):
            return forward(*args, **kwargs)

    return run


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over an inference tensor's memory (the base weights are only read).
    Tensor subclasses that keep their data elsewhere (quantized formats) are copied instead."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.clone()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on, even inside ComfyUI's inference-mode executor."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
