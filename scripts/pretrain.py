#!/usr/bin/env python3
"""Pretrain a PVA model on many people (HuggingFace accelerate), so that quick personalization
(40 steps) starts from an identity encoder and projections that already work.

One GPU, or the CPU:
    python scripts/pretrain.py --checkpoint sd-v1-5-inpainting.ckpt --data /data/people \
        --cache /data/people-faces --facenet 20180402-114759-vggface2.pt --output runs/pva-sd15
Several GPUs (one machine):
    accelerate launch --num_processes 8 scripts/pretrain.py ...      (or torchrun --nproc_per_node 8)
Several machines (run on each, machine_rank 0..N-1):
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 \
        --main_process_port 29500 --num_processes 16 scripts/pretrain.py ...
Continue a stopped run: the same command with --resume latest.

Run scripts/preprocess_faces.py on the dataset first (it fills --cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pack's pva/

from pva.errors import PVAError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.samples import SampleSettings

    d, s = PretrainingConfig(output_dir=Path(".")), SampleSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("what and where")
    base = where.add_mutually_exclusive_group(required=True)
    base.add_argument(
        "--checkpoint", help="the base model in one file (SD1.x / SD2.x / SDXL; inpainting or not)"
    )
    base.add_argument(
        "--diffusion-model",
        help="or the base in separate files (Flux, Flux Fill, Flux.2): its diffusion model",
    )
    where.add_argument(
        "--text-encoders", nargs="+", help="with --diffusion-model: e.g. clip_l.safetensors t5xxl.safetensors"
    )
    where.add_argument(
        "--clip-type", default="flux", help="with --diffusion-model: ComfyUI's CLIP type (flux, flux2, ...)"
    )
    where.add_argument("--vae", help="with --diffusion-model: the VAE file (e.g. ae.safetensors)")
    where.add_argument("--data", required=True, help="folder per person, or a CelebAHQ-IDI export")
    where.add_argument("--layout", default="auto", choices=["auto", "folders", "celebahq-idi"])
    where.add_argument("--cache", required=True, help="the face cache scripts/preprocess_faces.py made")
    where.add_argument("--facenet", help="FaceNet weights (needed for --stage 2, recorded otherwise)")
    where.add_argument("--output", required=True, help="run folder: checkpoints, logs, samples")
    where.add_argument(
        "--comfyui", help="ComfyUI's folder (default: $COMFYUI_PATH or the one holding this pack)"
    )
    where.add_argument("--init", help="start from this PVA file (e.g. stage 1's result for stage 2)")
    where.add_argument("--resume", help="'latest' or a checkpoint folder: continue that run exactly")
    train = p.add_argument_group("training")
    train.add_argument("--stage", type=int, default=d.stage, choices=[1, 2], help="2: also fine-tune FaceNet")
    train.add_argument("--train", default=d.train, choices=["both", "identity_encoder", "projections"])
    train.add_argument("--max-steps", type=int, default=d.max_steps)
    train.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-batch")
    train.add_argument("--gradient-accumulation", type=int, default=d.gradient_accumulation)
    train.add_argument(
        "--time-bins", type=int, default=d.time_bins, help="noise levels per target (stratified)"
    )
    train.add_argument("--resolution", type=int, default=s.resolution)
    train.add_argument(
        "--learning-rate", type=float, default=d.learning_rate, help="projections (and FaceNet)"
    )
    train.add_argument("--no-scale-lr", action="store_true", help="do not multiply it by the total batch")
    train.add_argument("--encoder-learning-rate", type=float, default=d.encoder_learning_rate)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    train.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    train.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 = off; e.g. 0.999")
    train.add_argument("--identity-dropout", type=float, default=s.identity_dropout)
    train.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--num-tokens", type=int, default=d.num_tokens)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--cpu", action="store_true", help="train on the CPU (automatic without a GPU)")
    train.add_argument("--workers", type=int, default=d.loader_workers, help="data-loader processes")
    data = p.add_argument_group("latents (the VAE's encodings of the training crops)")
    data.add_argument(
        "--latents", default=d.latents, choices=["cached", "per-step"],
        help="cached: each photo's views and masks encoded once, before the first step (made again when the VAE, "
        "resolution or crop settings change); per-step: a fresh crop and mask through the VAE every sample",
    )  # fmt: skip
    data.add_argument("--latent-views", type=int, default=d.latent_views, help="cached crops per photo")
    data.add_argument("--latent-masks", type=int, default=d.latent_masks, help="cached masks per crop")
    data.add_argument("--latents-dir", help="where cached latents go (default: <--cache>/latents)")
    out = p.add_argument_group("checkpoints, validation, logs")
    out.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    out.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    out.add_argument("--validate-every", type=int, default=d.validate_every)
    out.add_argument("--validation-samples", type=int, default=d.validation_samples)
    out.add_argument("--preview-samples", type=int, default=d.preview_samples, help="rows of the sample grid")
    out.add_argument("--preview-steps", type=int, default=d.preview_steps, help="sampling steps of the grid")
    out.add_argument("--log-with", default="tensorboard", choices=["tensorboard", "none"])
    args = p.parse_args(argv)
    split = {"--text-encoders": args.text_encoders, "--vae": args.vae}
    if args.diffusion_model and not all(split.values()):
        p.error("--diffusion-model needs --text-encoders and --vae (the files ComfyUI loads beside it).")
    if args.checkpoint and any(split.values()):
        p.error(
            f"{' and '.join(k for k, v in split.items() if v)} go with --diffusion-model; a --checkpoint holds its own."
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PVAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from pva.launch import launch

    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":  # bf16 where the GPU has it natively, else full precision
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        mixed_precision = "bf16" if native_bf16 and not args.cpu else "no"
    log_with = None
    if args.log_with == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            print("TensorBoard is not installed (pip install tensorboard): no logs, only the console.")
        else:
            log_with = "tensorboard"
    accelerator = launch(
        args.comfyui,
        cpu=True if args.cpu else None,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation,
        log_with=log_with,
        project_dir=Path(args.output) / "logs",
    )

    from pva.data.datasets import open_dataset
    from pva.data.preprocess import load_faces
    from pva.method.weights import save_pva
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.run import config_for_logging, pretrain
    from pva.pretraining.samples import SampleSettings
    from pva.pretraining.session import load_base, load_split_base

    config = PretrainingConfig(
        output_dir=Path(args.output),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        time_bins=args.time_bins,
        learning_rate=args.learning_rate,
        scale_lr=not args.no_scale_lr,
        encoder_learning_rate=args.encoder_learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        ema_decay=args.ema_decay,
        stage=args.stage,
        train=args.train,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        validation_samples=args.validation_samples,
        preview_samples=args.preview_samples,
        preview_steps=args.preview_steps,
        num_tokens=args.num_tokens,
        seed=args.seed,
        loader_workers=args.workers,
        samples=SampleSettings(resolution=args.resolution, identity_dropout=args.identity_dropout),
        latents=args.latents,
        latent_views=args.latent_views,
        latent_masks=args.latent_masks,
        latents_dir=Path(args.latents_dir) if args.latents_dir else None,
    )
    config.validate()
    dataset = open_dataset(args.data, layout=args.layout, seed=args.seed)
    faces = load_faces(args.cache, [*dataset.splits.get("train", ()), *dataset.splits.get("val", ())])
    facenet = None
    if args.stage == 2:
        if not args.facenet:
            raise PVAError("--stage 2 fine-tunes FaceNet: give --facenet.")
        from pva.faces.facenet import load_facenet_model

        facenet = load_facenet_model(args.facenet)
    if args.checkpoint:
        base = load_base(args.checkpoint)
    else:
        base = load_split_base(args.diffusion_model, args.text_encoders, args.clip_type, args.vae)
    if accelerator.is_main_process:
        print(dataset.describe(), flush=True)
        print(
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}), total batch "
            f"{config.total_batch(accelerator.num_processes)} x {config.time_bins} noise levels, "
            f"mixed precision {mixed_precision}",
            flush=True,
        )
    if log_with:
        accelerator.init_trackers("pva_pretraining", config=config_for_logging(config))
    result = pretrain(
        config, base, dataset, faces, accelerator, facenet=facenet, resume=args.resume, init=args.init
    )
    accelerator.end_training()
    if accelerator.is_main_process:
        final = (
            Path(args.output)
            / f"pva-{Path(args.checkpoint or args.diffusion_model).stem}-step{config.max_steps}.safetensors"
        )
        save_pva(result.pva, final, overwrite=True)
        print(f"saved {final} (copy it to ComfyUI/models/pva/ to use it with Load PVA Model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
