"""Seconds per pretraining step vs a bare forward + backward of the same UNet at the same batch,
where a step's time goes, samples per second with 1 and 2 processes, and peak memory.

All variants use the full-size SD1.5-inpainting UNet and VAE (ComfyUI's classes, random weights)
at the same batch (batch_size targets x time_bins noise levels) and run in their own processes:

  bare      the plain UNet, forward + backward + AdamW step, training only the cross-attention
            layers' to_k/to_v weights (the cheapest comparable fine-tune; its latents are given)
  pva       pva.pretraining.run: a full training step (data loading, the cached latents
            (latent_cache.py, built once before the timed steps and reported apart), ComfyUI's
            cond batching, identity encoder + parallel projections, AdamW), 1 process
  per-step  the same with --latents per-step: every target cropped, masked and VAE-encoded in
            the step, as before the latent cache
  pva-1t    pva with 1 torch thread, and pva-2p: 2 processes (torchrun, gloo on CPU / NCCL on
            GPUs) with 1 thread each: the scaling efficiency (samples/s of 2 / twice those of 1)

The data are the first --people training people of the tests' synthetic world (built and cached
on first use). Target: pva / bare <= 1.15 per step. On a GPU it also prints what 50k steps would
take on 8 GPUs.

    python bench/pretraining_speed.py [--size 128] [--steps 3] [--batch 2] [--time-bins 2]
                                      [--device auto|cpu] [--mixed-precision no|bf16] [--people 16]
                                      [--gradient-checkpointing] [--no-two-processes] [--no-per-step]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]
from attention_speed import RESULTS  # noqa: E402
from personalization_speed import peak_memory_gb, run_bare  # noqa: E402

TARGET = 1.15
PHASES = ("data", "text", "vae", "conditioning", "forward", "backward", "optimizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="training crop size in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2, help="targets per process")
    parser.add_argument("--time-bins", type=int, default=2)
    parser.add_argument(
        "--people", type=int, default=16, help="training people (the cache's build time grows with them)"
    )
    parser.add_argument("--workers", type=int, default=1, help="data-loader processes per training process")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-two-processes", action="store_true")
    parser.add_argument(
        "--no-per-step", action="store_true", help="skip the variant without the latent cache"
    )
    parser.add_argument(
        "--paper-size", type=int, default=512, help="crop size of the GPU-hours on paper (0: none)"
    )
    parser.add_argument("--variant", choices=["bare", "pva", "flops"], help=argparse.SUPPRESS)
    parser.add_argument("--latents", choices=["cached", "per-step"], default="cached", help=argparse.SUPPRESS)
    parser.add_argument("--latents-dir", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args) -> None:
    from pva.launch import make_accelerator

    accelerator = None
    if args.variant == "pva":
        accelerator = make_accelerator(
            cpu=True if args.device == "cpu" else None, mixed_precision=args.mixed_precision
        )
    from harness.host import import_comfy_on_cpu

    if args.device == "cpu" or (accelerator is not None and accelerator.device.type == "cpu"):
        import_comfy_on_cpu()
    else:
        from pva.launch import import_comfyui

        import_comfyui(cpu=False)
    import comfy.model_management
    import torch
    from attention_speed import build_unet

    from pva.pretraining.phases import StepPhases

    device = comfy.model_management.get_torch_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    phases = StepPhases(torch.cuda.synchronize if device.type == "cuda" else None)
    result = {"variant": args.variant, "device": device.type, "threads": torch.get_num_threads()}
    if args.variant == "flops":
        print(json.dumps({"flops": bare_step_flops(torch, args.paper_size)}))
        return
    if args.variant == "bare":
        with torch.no_grad():
            patcher = build_unet(device, torch.float32)
        bare_args = argparse.Namespace(
            size=args.size, steps=args.steps, time_bins=args.batch * args.time_bins
        )
        result["times"] = run_bare(torch, patcher, bare_args, device, phases)
        result["phases"] = {k: v / args.steps for k, v in phases.take().items()}
        result["processes"] = 1
    else:
        result.update(run_pva(torch, args, device, accelerator, phases))
        result["processes"] = accelerator.num_processes
    result["peak_gb"] = peak_memory_gb(torch, device)
    if accelerator is None or accelerator.is_main_process:
        print(json.dumps(result))


def bare_step_flops(torch, size: int) -> float:
    """FLOPs of one sample's bare training step (forward + backward of the frozen UNet, the
    cross-attention to_k/to_v trained) at size x size pixels, counted by torch."""
    from attention_speed import build_unet
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        patcher = build_unet(torch.device("cpu"), torch.float32)
    unet = patcher.model.diffusion_model.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_k.weight.requires_grad_(True)
            module.to_v.weight.requires_grad_(True)
    latent = size // 8
    x, context = torch.randn(1, 9, latent, latent), torch.randn(1, 77, 768)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500.0]), context).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def run_pva(torch, args, device, accelerator, phases) -> dict:
    import comfy.sd
    from attention_speed import build_unet
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from harness.models import SD_VAE_DDCONFIG, fill_random
    from harness.pretraining import synthetic_world, tiny_text_encoder

    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.run import pretrain
    from pva.pretraining.samples import SampleSettings
    from pva.pretraining.session import Base

    with accelerator.main_process_first():
        world = synthetic_world()
    dataset = world.dataset()
    dataset = replace(dataset, splits=dict(dataset.splits, train=dataset.splits["train"][: args.people]))
    with torch.inference_mode():  # as ComfyUI's loaders make it
        patcher = build_unet(device, torch.float32)
    autoencoder = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    fill_random(autoencoder, 3)
    params = {"embed_dim": 4, "ddconfig": dict(SD_VAE_DDCONFIG)}
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params})
    base = Base(patcher, vae, tiny_text_encoder(), "random SD1.5-inpainting", "bench")
    stamps, per_step = [], []

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        per_step.append(phases.take())

    # one output folder for all processes (the main one writes the caption cache the others read)
    shared = (
        Path(tempfile.gettempdir()) / f"pva-bench-pretraining-{os.environ.get('MASTER_PORT', os.getpid())}"
    )
    with accelerator.main_process_first():
        shared.mkdir(exist_ok=True)
    stamps.append(time.perf_counter())
    try:
        config = PretrainingConfig(
            output_dir=shared, max_steps=args.steps + 1, batch_size=args.batch, gradient_accumulation=1,
            time_bins=args.time_bins, gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=10**9,
            validate_every=10**9, validation_samples=2, preview_samples=0, loader_workers=args.workers, samples=SampleSettings(resolution=args.size),
            latents=args.latents, latents_dir=Path(args.latents_dir),
        )  # fmt: skip
        pretrain(config, base, dataset, world.faces(), accelerator, on_step=on_step, phases=phases)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(shared, ignore_errors=True)
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    timed = per_step[1:]  # the first step includes the data loader's start and the cache's making
    faces = world.faces()
    people = [p for p in dataset.splits["train"] if p in faces]
    built = dict(seconds=per_step[0].get("latent cache", 0.0), people=len(people), views=config.latent_views,
                 photos=sum(len(faces[p]) for p in people), masks=config.latent_masks)  # fmt: skip
    return {
        "times": times[1:],
        "phases": {k: sum(t.get(k, 0.0) for t in timed) / len(timed) for k in PHASES},
        "cache_build": built,
    }


# The research recipe (PVA_METHOD.md): 50k steps of batch 2 x accumulation 4 x 8 GPUs, each target
# at 4 noise levels, 512 px. Assumptions, not measurements: the GPU's dense bf16 peak, and the
# fraction of it a UNet training step reaches (model FLOP utilization; 35% is taken).
RECIPE = dict(steps=50_000, targets_per_step=2 * 4 * 8, time_bins=4, gpus=8)
PEAK_TFLOPS = {"A100": 312, "H100": 989}
UTILIZATION = 0.35


def on_paper(args, flops_per_sample: float, ratio: float, efficiency: float | None) -> None:
    samples = RECIPE["steps"] * RECIPE["targets_per_step"] * RECIPE["time_bins"]
    total = samples * flops_per_sample * ratio  # the measured pva/bare step ratio on top of the UNet
    print(f"on paper, the research recipe ({RECIPE['steps']} steps x {RECIPE['targets_per_step']} targets x "
          f"{RECIPE['time_bins']} noise levels at {args.paper_size} px): a bare UNet sample step is "
          f"{flops_per_sample / 1e12:.3f} TFLOP (counted), x {ratio:.3f} for PVA (measured here) = "
          f"{total / 1e18:.1f} EFLOP in all")  # fmt: skip
    for gpu, peak in PEAK_TFLOPS.items():
        hours = total / (peak * 1e12 * UTILIZATION) / 3600
        step = hours * 3600 / RECIPE["steps"]
        print(f"  {gpu} (bf16 peak {peak} TFLOP/s, {UTILIZATION:.0%} utilization assumed): {hours:.0f} GPU-hours, "
              f"{hours / RECIPE['gpus']:.1f} h on {RECIPE['gpus']} GPUs, {step:.2f} s per step")  # fmt: skip
    if efficiency:
        print(f"  (if 8 GPUs scaled as the 2 CPU processes did here, efficiency {efficiency:.2f}: "
              f"{1 / efficiency:.2f}x those hours; NCCL between GPUs is not measured)")  # fmt: skip


def _run(args, argv, variant, processes=1, extra=()) -> dict:
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    own += ["--latents-dir", args.latents_dir, *extra]
    if processes == 1:
        command = [sys.executable, __file__, *own, "--variant", variant]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={port}", __file__, *own, "--variant", variant]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1") if "--threads" in extra else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    output = done.stdout
    return json.loads([line for line in output.strip().splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="pva-bench-latents-") as latents:
        args.latents_dir = latents  # one cache for every variant: built by the first, reused after
        results = {"bare": _run(args, argv, "bare"), "pva": _run(args, argv, "pva")}
        if not args.no_per_step:
            results["per-step"] = _run(args, argv, "pva", extra=("--latents", "per-step"))
        if not args.no_two_processes:
            results["pva-1t"] = _run(args, argv, "pva", extra=("--threads", "1"))
            results["pva-2p"] = _run(args, argv, "pva", processes=2, extra=("--threads", "1"))
            if results["pva-2p"]["processes"] != 2:
                sys.exit(
                    f"the 2-process run saw {results['pva-2p']['processes']} process(es): no scaling figure"
                )
    if args.paper_size:
        results["flops"] = _run(args, argv, "flops")
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    flops = results.pop("flops", None)
    step = {k: sorted(v["times"])[len(v["times"]) // 2] for k, v in results.items()}
    per_step = args.batch * args.time_bins
    print(f"device {results['bare']['device']}, {args.size}x{args.size}, batch {args.batch} targets x "
          f"{args.time_bins} noise levels per process, mixed precision {args.mixed_precision}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.people} people")  # fmt: skip
    print(f"{'variant':<9}{'processes':>10}{'threads':>8}{'s/step':>10}{'samples/s':>12}{'peak GiB':>10}")
    for name, result in results.items():
        samples = per_step * result["processes"] / step[name]
        print(f"{name:<9}{result['processes']:>10}{result['threads']:>8}{step[name]:>10.3f}{samples:>12.2f}"
              f"{result['peak_gb']:>10.2f}")  # fmt: skip
    print("where a step's time goes (s, mean of the timed steps; 'other': the rest of the step, e.g. the "
          "loss's reduction across processes, the EMA and progress bookkeeping):")  # fmt: skip
    print(f"{'variant':<9}" + "".join(f"{p:>13}" for p in (*PHASES, "other")))
    for name in ("bare", "pva", "per-step"):
        if name in results:
            phases = results[name]["phases"]
            mean = sum(results[name]["times"]) / len(results[name]["times"])  # (the phases are means too)
            other = mean - sum(phases.get(p, 0.0) for p in PHASES)
            print(f"{name:<9}" + "".join(f"{phases.get(p, 0.0):>13.3f}" for p in PHASES) + f"{other:>13.3f}")
    built = results["pva"]["cache_build"]  # (the first run with cached latents makes them)
    if built["seconds"]:
        photos = built["photos"]
        print(f"latent cache, built once: {built['seconds']:.1f} s for {built['people']} people, {photos} photos x "
              f"{built['views']} views x (1 + {built['masks']} masks) = {built['seconds'] / photos:.2f} s per photo")  # fmt: skip
    ratio = step["pva"] / step["bare"]
    print(f"pva / bare step: {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}), "
          f"peak memory {results['pva']['peak_gb'] / results['bare']['peak_gb']:.3f}")  # fmt: skip
    if "per-step" in results:
        print(f"per-step / bare step: {step['per-step'] / step['bare']:.3f} (without the latent cache); "
              f"the cache saves {1 - step['pva'] / step['per-step']:.0%} of a step")  # fmt: skip
    if "pva-2p" in results:
        rate_1 = per_step / step["pva-1t"]
        rate_2 = per_step * 2 / step["pva-2p"]
        print(f"scaling, 1 thread per process: 1 process {rate_1:.3f} samples/s, 2 processes {rate_2:.3f} samples/s: "
              f"efficiency {rate_2 / (2 * rate_1):.2f} (1.00 = perfect)")  # fmt: skip
    if flops:
        on_paper(args, flops["flops"], ratio, results.get("pva-2p") and rate_2 / (2 * rate_1))
    if results["bare"]["device"] == "cuda":
        hours = 50_000 * step["pva"] / 3600
        print(f"50k steps at this batch per GPU: {hours:.1f} h on 1 GPU; about {hours / 8:.1f} h on 8 GPUs "
              "(the global batch grows 8x; keep the number of samples, not steps, to compare)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pretraining_speed-{results['bare']['device']}-{args.size}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=2))
    print(f"written {out.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    sys.exit(main())
