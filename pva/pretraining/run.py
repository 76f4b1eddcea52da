"""Pretraining a PVA model on many people with HuggingFace accelerate (one GPU, several, or
several machines), so that quick personalization starts from an identity encoder and parallel
projections that already know what a face embedding says about a face: the run loop (optimizer,
schedule, EMA, checkpoints, validation, logs) around the session's steps (session.py).

The frozen base is a ComfyUI MODEL (from ComfyUI's own checkpoint loader), and the loss is the
one quick personalization uses (`TrainingSession.loss`: ComfyUI's inpaint conditioning and cond
batching, time-stratified noise levels). What trains: the identity encoder and the parallel
projections (stage 1), and FaceNet too with stage 2.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import comfy.model_management
import torch
from safetensors.torch import load_file, save_file

from ..data.datasets import FaceDataset
from ..data.preprocess import PersonFaces
from ..errors import PVAError
from ..files import make_writable_folder, write_atomically
from ..method.model import PVAModel
from ..method.patching import check_compatible
from ..method.weights import load_pva, save_pva
from ..training.session import training_mode
from .checkpoints import STATE_FORMAT, find_checkpoint, read_state, save_checkpoint
from .checkpoints import recover as recover_checkpoints
from .config import PretrainingConfig
from .latent_cache import LatentCache, build_latent_cache
from .phases import StepPhases
from .samples import PretrainingSamples, SampleBatch, StepSampler
from .session import Base, PretrainingSession, PretrainingStep, text_cache_for
from .validation import identity_gaps, preview_grid, validation_samples

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class PretrainingResult:
    pva: PVAModel  # the exported weights (EMA when on), on the CPU
    losses: list[float]
    validation: list[dict]
    output_dir: Path


def pretrain(
    config: PretrainingConfig,
    base: Base,
    dataset: FaceDataset,
    faces: dict[str, PersonFaces],
    accelerator: Accelerator,
    facenet: torch.nn.Module | None = None,
    resume: str | None = None,
    init: str | os.PathLike | None = None,
    on_step: Callable[[int, float], None] | None = None,
    phases: StepPhases | None = None,
) -> PretrainingResult:
    """Pretrain (or continue pretraining) a PVA model; checkpoints go to config.output_dir.

    faces: the preprocessing cache of the dataset (pva.data.preprocess.load_faces). facenet: the
    FaceNet to fine-tune in stage 2. resume: 'latest' or a checkpoint folder. init: a PVA file
    to start from (e.g. stage 1's result for stage 2). on_step(step, loss) after every step;
    phases: where the steps' time goes (the speed bench)."""
    config.validate()
    accelerator.gradient_accumulation_steps = config.gradient_accumulation  # accumulate() follows it
    output_dir = Path(config.output_dir)
    make_writable_folder(output_dir, "output")
    if accelerator.is_main_process:
        for line in recover_checkpoints(output_dir):  # what a killed run left half-way
            print(f"[PVA pretraining] {line}", flush=True)
    accelerator.wait_for_everyone()
    train_people = [p for p in dataset.splits.get("train", ()) if p in faces]
    val_people = [p for p in dataset.splits.get("val", ()) if p in faces]
    if config.stage == 2 and facenet is None:
        raise PVAError("stage 2 fine-tunes FaceNet: give the FaceNet weights (--facenet).")
    samples = PretrainingSamples(
        dataset, faces, train_people, replace(config.samples, with_crops=config.stage == 2), seed=config.seed
    )
    texts = text_cache_for(output_dir, base, dataset, train_people + val_people, accelerator)

    with training_mode():
        pva = _starting_pva(base, config, init)
        state, start_step = None, 0
        if resume:
            state = _resume_into(pva, facenet, base, output_dir, resume)
            start_step = state["step"]
        if facenet is not None:
            facenet.eval().requires_grad_(config.stage == 2)  # BatchNorm statistics stay as pretrained
        step_module = PretrainingStep(pva, facenet if config.stage == 2 else None)
        with PretrainingSession(base, pva, config, texts) as session:
            session.phases = phases = phases or StepPhases.off()
            if config.latents == "cached":
                with phases("latent cache"):
                    inpainting = not session.masked_loss
                    samples.latents = _latent_cache(config, base, samples, faces, inpainting, accelerator)
            optimizer = _optimizer(pva, step_module.facenet, config, accelerator.num_processes)
            schedule = _schedule(optimizer, config.warmup_steps)
            model, optimizer = accelerator.prepare(step_module, optimizer)
            run = _Run(config, accelerator, session, model, step_module, optimizer, schedule)
            run.describe(dataset, faces, train_people, base)
            if state is not None:
                run.load_state(state)
            if len(val_people) >= 2:
                run.held_out = validation_samples(dataset, faces, val_people, config)
            elif accelerator.is_main_process:
                print(
                    "[PVA pretraining] no validation: the val split has fewer than 2 usable people.",
                    flush=True,
                )
            loader = torch.utils.data.DataLoader(
                samples,
                batch_sampler=StepSampler(
                    start_step,
                    config.max_steps,
                    config.batch_size,
                    config.gradient_accumulation,
                    accelerator.num_processes,
                    accelerator.process_index,
                ),
                collate_fn=SampleBatch.of,
                num_workers=config.loader_workers,
            )
            run.train(loader, start_step, on_step)
            exported = run.exported()
    return PretrainingResult(exported, run.losses, run.validation, output_dir)


def _latent_cache(
    config: PretrainingConfig,
    base: Base,
    samples: PretrainingSamples,
    faces: dict[str, PersonFaces],
    inpainting: bool,
    accelerator: Accelerator,
) -> LatentCache:
    """The training people's latents, made where missing (once; split among the processes)."""
    root = config.latents_dir or Path(next(iter(faces.values())).path).parents[1] / "latents"
    cache = LatentCache.for_run(root, base.vae, samples, config.latent_views, config.latent_masks, inpainting)
    started = time.monotonic()
    made = build_latent_cache(cache, samples, base.vae, accelerator)
    made = int(accelerator.reduce(torch.tensor(made, device=accelerator.device), reduction="sum").item())
    if accelerator.is_main_process and made:
        print(f"[PVA pretraining] cached the latents of {made} people in {cache.folder} "
              f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
    return cache


def _starting_pva(base: Base, config: PretrainingConfig, init: str | os.PathLike | None) -> PVAModel:
    if init is not None:
        pva = load_pva(init)
        try:
            check_compatible(pva, base.model)
        except PVAError as error:
            raise PVAError(f"--init: {init} does not fit the base model: {error}") from None
    else:
        pva = PVAModel.initialize_from(
            base.model,
            num_tokens=config.num_tokens,
            seed=config.seed,
            encoder_depth=config.encoder_depth,
            encoder_heads=config.encoder_heads,
        )
    pva.identity_encoder.set_dropout(config.encoder_dropout)
    return pva


def _resume_into(
    pva: PVAModel, facenet: torch.nn.Module | None, base: Base, output_dir: Path, resume: str
) -> dict:
    folder = find_checkpoint(output_dir, resume)
    raw = folder / "pva-raw.safetensors"  # the trained weights when the export is an EMA
    weights = raw if raw.is_file() else folder / "pva.safetensors"
    try:
        resumed = load_pva(weights)
    except PVAError as error:
        raise PVAError(f"{weights}: {error} Resume from another checkpoint (--resume <folder>).") from None
    try:
        check_compatible(resumed, base.model)
    except PVAError as error:
        raise PVAError(f"--resume: {folder} does not fit the base model: {error}") from None
    if resumed.num_tokens != pva.num_tokens or resumed.identity_encoder.config != pva.identity_encoder.config:
        raise PVAError(
            f"--resume: {folder} has another identity encoder ({resumed.identity_encoder.config})."
        )
    with torch.no_grad():
        for target, source in zip(pva.parameters(), resumed.parameters(), strict=True):
            target.copy_(source)
    facenet_file = folder / "facenet.safetensors"
    if facenet is not None and facenet_file.is_file():
        try:
            facenet.load_state_dict(load_file(str(facenet_file)))
        except Exception as error:  # safetensors' own errors, or tensors of another network
            raise PVAError(
                f"{facenet_file}: cannot be read ({error}); resume from another checkpoint (--resume <folder>)."
            ) from None
    return read_state(folder)


def _optimizer(
    pva: PVAModel, facenet: torch.nn.Module | None, config: PretrainingConfig, processes: int
) -> torch.optim.AdamW:
    scale = config.total_batch(processes) if config.scale_lr else 1
    groups = []
    if config.train in ("both", "projections"):
        groups.append({"params": list(pva.projections.parameters()), "lr": config.learning_rate * scale})
    if config.train in ("both", "identity_encoder"):
        groups.append({"params": list(pva.identity_encoder.parameters()), "lr": config.encoder_learning_rate})
    if facenet is not None:
        groups.append({"params": list(facenet.parameters()), "lr": config.learning_rate * scale})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    # Constant after a linear warm-up, stepped once per optimizer step. (Not through accelerate,
    # whose prepared scheduler steps once per process: the schedule would depend on their number.)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))


class _Run:
    """The training loop and what it keeps: losses, validation, EMA, checkpoints."""

    def __init__(self, config, accelerator, session, model, step_module, optimizer, schedule):  # noqa: ANN001
        self.config, self.accelerator, self.session = config, accelerator, session
        self.model, self.step_module, self.optimizer, self.schedule = model, step_module, optimizer, schedule
        self.trainable = [p for p in step_module.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.trainable] if config.ema_decay > 0 else None
        self.losses: list[float] = []
        self.validation: list[dict] = []
        self.held_out = None

    def describe(self, dataset: FaceDataset, faces: dict, train_people: list[str], base: Base) -> None:
        config, accelerator = self.config, self.accelerator
        self.provenance = {
            "dataset": str(dataset.root),
            "layout": dataset.layout,
            "people": len(train_people),
            "photos": sum(len(faces[p]) for p in train_people),
            "base": base.name,
            "stage": config.stage,
            "batch_size": config.batch_size,
            "gradient_accumulation": config.gradient_accumulation,
            "processes": accelerator.num_processes,
            "machines": int(os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("NNODES") or 1),
            "total_batch": config.total_batch(accelerator.num_processes),
            "time_bins": config.time_bins,
            "resolution": config.samples.resolution,
            "learning_rate": config.learning_rate,
            "scale_lr": config.scale_lr,
            "encoder_learning_rate": config.encoder_learning_rate,
            "ema_decay": config.ema_decay,
            "identity_dropout": config.samples.identity_dropout,
            "seed": config.seed,
        }

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema = [t.to(p.device) for t, p in zip(state["ema"], self.trainable, strict=True)]
        self.losses, self.validation = list(state.get("losses", [])), list(state.get("validation", []))

    def train(
        self,
        loader: torch.utils.data.DataLoader,
        start_step: int,
        on_step: Callable[[int, float], None] | None,
    ) -> None:
        from tqdm import tqdm

        config, accelerator = self.config, self.accelerator
        progress = tqdm(
            total=config.max_steps,
            initial=start_step,
            desc="PVA pretraining",
            disable=not accelerator.is_main_process,
        )
        micro_batches = iter(loader)
        started = time.monotonic()
        phases = self.session.phases
        for step in range(start_step, config.max_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            # identity-encoder dropout: the same draws whatever the restarts
            torch.manual_seed(hash((config.seed, step, accelerator.process_index)) & (2**62 - 1))
            total = torch.zeros((), device=self.session.device)
            for _ in range(config.gradient_accumulation):
                with phases("data"):
                    micro_batch = next(micro_batches)
                batch = self.session.prepare(micro_batch)
                with accelerator.accumulate(self.model):
                    with phases("forward"):
                        loss = self.model(batch, self.session)
                    with phases("backward"):
                        accelerator.backward(loss)
                    with phases("optimizer"):
                        if accelerator.sync_gradients and config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach() / config.gradient_accumulation
            self.schedule.step()
            self._update_ema()
            mean_loss = accelerator.reduce(total, reduction="mean").item()
            if not math.isfinite(mean_loss):
                raise PVAError(
                    f"pretraining diverged at step {step + 1} (loss {mean_loss}); lower the learning rate."
                )
            self.losses.append(mean_loss)
            done = step + 1
            learning_rate = self.schedule.get_last_lr()[0]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}")
            progress.update(1)
            accelerator.log({"train/loss": mean_loss, "train/lr": learning_rate}, step=done)
            if on_step:
                on_step(done, mean_loss)
            if self.held_out is not None and (done % config.validate_every == 0 or done == config.max_steps):
                self.validate(done)
            if done % config.checkpoint_every == 0 or done == config.max_steps:
                self.checkpoint(done, time.monotonic() - started)
        progress.close()

    def _update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for average, parameter in zip(self.ema, self.trainable, strict=True):
                    average.lerp_(parameter.detach(), 1 - self.config.ema_decay)

    def exported(self) -> PVAModel:
        """The weights a user gets (the moving average when EMA is on), on the CPU, with how
        they were made in their header."""
        pva = copy.deepcopy(self.step_module.pva).to("cpu").eval().requires_grad_(False)
        pva.provenance = dict(pva.provenance, pretrained=dict(self.provenance, steps=len(self.losses)))
        if self.ema is not None:
            averages = {id(p): e for p, e in zip(self.trainable, self.ema, strict=True)}
            with torch.no_grad():
                for original, target in zip(self.step_module.pva.parameters(), pva.parameters(), strict=True):
                    if id(original) in averages:
                        target.copy_(averages[id(original)])
        return pva

    def checkpoint(self, step: int, seconds: float) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            provenance = dict(self.provenance, steps=step)
            exported = self.exported()
            state = {
                "format": STATE_FORMAT,
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "ema": [t.detach().cpu() for t in self.ema] if self.ema is not None else [],
                "losses": self.losses,
                "validation": self.validation,
            }
            files: dict[str, Callable[[Path], None]] = {
                "pva.safetensors": lambda path: save_pva(exported, path, overwrite=True),
                "state.pt": lambda path: torch.save(state, path),
            }
            if self.ema is not None:  # resuming continues from the trained weights, not the average
                files["pva-raw.safetensors"] = lambda path: save_pva(
                    self.step_module.pva, path, overwrite=True
                )
            if self.step_module.facenet is not None:
                tensors = {
                    k: v.detach().cpu().contiguous() for k, v in self.step_module.facenet.state_dict().items()
                }
                files["facenet.safetensors"] = lambda path: save_file(tensors, str(path))
            save_checkpoint(
                Path(self.config.output_dir),
                step,
                files,
                {"step": step, "seconds": round(seconds, 1), "pretrained": provenance},
                self.config.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    def validate(self, step: int) -> None:
        config, accelerator = self.config, self.accelerator
        result = identity_gaps(
            self.session,
            self.step_module,
            self.held_out,
            config.validation_samples,
            config.batch_size,
            accelerator,
        )
        result = {"step": step, **result}
        self.validation.append(result)
        accelerator.log({f"val/{k}": v for k, v in result.items() if k != "step"}, step=step)
        if accelerator.is_main_process:
            print(
                f"\n[PVA pretraining] step {step}: held-out face loss with own identity {result['own']:.4f}, "
                f"none {result['none']:.4f}, another person's {result['other']:.4f}",
                flush=True,
            )
            if config.preview_samples > 0:
                grid = preview_grid(
                    self.session,
                    self.step_module,
                    self.held_out,
                    config.preview_samples,
                    config.preview_steps,
                )
                self._save_grid(grid, step)

    def _save_grid(self, grid: torch.Tensor, step: int) -> None:
        import numpy as np
        from PIL import Image

        image = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
        path = Path(self.config.output_dir) / "samples" / f"step-{step:07d}.png"
        write_atomically(path, lambda temp: image.save(temp, format="PNG"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("val/inpainted", grid.permute(2, 0, 1), step)


def config_for_logging(config: PretrainingConfig) -> dict:
    """A flat dict of plain values (TensorBoard's hyper-parameters)."""
    flat = {}
    for key, value in asdict(config).items():
        if isinstance(value, dict):
            flat.update({f"samples.{k}": str(v) if isinstance(v, tuple) else v for k, v in value.items()})
        else:
            flat[key] = str(value) if isinstance(value, Path) else value
    return flat
