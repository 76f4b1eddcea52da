"""Seconds per pretraining step vs a bare forward + backward of the same UNet at the same batch,
samples per second with 1 and 2 processes, and peak memory.

All variants use the full-size SD1.5-inpainting UNet (ComfyUI's classes, random weights) at the
same batch (batch_size targets x time_bins noise levels) and run in their own processes:

  bare   the plain UNet, forward + backward + AdamW step, training only the cross-attention
         layers' to_k/to_v weights (the cheapest comparable fine-tune)
  pva    pva.pretraining.run: a full training step (data loading, the VAE's inpainting latents,
         ComfyUI's cond batching, identity encoder + parallel projections, AdamW), 1 process
  pva2   the same with 2 processes (torchrun, gloo on CPU / NCCL on GPUs): samples per second

The data are the tests' synthetic people (built and cached on first use). Target: pva / bare
<= 1.15 per step. On a GPU it also prints what 50k steps would take on 8 GPUs.

    python bench/pretraining_speed.py [--size 256] [--steps 3] [--batch 2] [--time-bins 2]
                                      [--device auto|cpu] [--mixed-precision no|bf16]
                                      [--gradient-checkpointing] [--no-two-processes]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]
from attention_speed import RESULTS  # noqa: E402
from personalization_speed import peak_memory_gb, run_bare  # noqa: E402

TARGET = 1.15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="training crop size in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2, help="targets per process")
    parser.add_argument("--time-bins", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-two-processes", action="store_true")
    parser.add_argument("--variant", choices=["bare", "pva"], help=argparse.SUPPRESS)
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

    device = comfy.model_management.get_torch_device()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["WORLD_SIZE"])))
    if args.variant == "bare":
        with torch.no_grad():
            patcher = build_unet(device, torch.float32)
        bare_args = argparse.Namespace(
            size=args.size, steps=args.steps, time_bins=args.batch * args.time_bins
        )
        times = run_bare(torch, patcher, bare_args, device)
    else:
        times = run_pva(torch, args, device, accelerator)
    if accelerator is None or accelerator.is_main_process:
        print(json.dumps({"variant": args.variant, "device": device.type, "times": times,
                          "peak_gb": peak_memory_gb(torch, device),
                          "processes": 1 if accelerator is None else accelerator.num_processes}))  # fmt: skip


def run_pva(torch, args, device, accelerator) -> list[float]:
    import tempfile

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
    with torch.inference_mode():  # as ComfyUI's loaders make it
        patcher = build_unet(device, torch.float32)
    autoencoder = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    fill_random(autoencoder, 3)
    params = {"embed_dim": 4, "ddconfig": dict(SD_VAE_DDCONFIG)}
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params})
    base = Base(patcher, vae, tiny_text_encoder(), "random SD1.5-inpainting", "bench")
    stamps = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    # one output folder for all processes (the main one writes the caption cache the others read)
    shared = (
        Path(tempfile.gettempdir()) / f"pva-bench-pretraining-{os.environ.get('MASTER_PORT', os.getpid())}"
    )
    with accelerator.main_process_first():
        shared.mkdir(exist_ok=True)
    try:
        config = PretrainingConfig(
            output_dir=shared, max_steps=args.steps + 1, batch_size=args.batch, gradient_accumulation=1,
            time_bins=args.time_bins, gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=10**9,
            validate_every=10**9, preview_samples=0, loader_workers=2, samples=SampleSettings(resolution=args.size),
        )  # fmt: skip
        pretrain(config, base, world.dataset(), world.faces(), accelerator, on_step=on_step)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(shared, ignore_errors=True)
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    return times[1:]  # the first step includes the data loader's start


def _run(args, argv, variant, processes=1) -> dict:
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    if processes == 1:
        command = [sys.executable, __file__, *own, "--variant", variant]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={port}", __file__, *own, "--variant", variant]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    output = done.stdout
    return json.loads([line for line in output.strip().splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return 0
    results = {"bare": _run(args, argv, "bare"), "pva": _run(args, argv, "pva")}
    if not args.no_two_processes:
        results["pva2"] = _run(args, argv, "pva", processes=2)
    step = {k: sorted(v["times"])[len(v["times"]) // 2] for k, v in results.items()}
    per_step = args.batch * args.time_bins
    print(f"device {results['bare']['device']}, {args.size}x{args.size}, batch {args.batch} targets x "
          f"{args.time_bins} noise levels per process, mixed precision {args.mixed_precision}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")  # fmt: skip
    print(f"{'variant':<8}{'processes':>10}{'s/step':>10}{'samples/s':>12}{'peak GiB':>10}")
    for name, result in results.items():
        samples = per_step * result["processes"] / step[name]
        print(
            f"{name:<8}{result['processes']:>10}{step[name]:>10.3f}{samples:>12.2f}{result['peak_gb']:>10.2f}"
        )
    ratio = step["pva"] / step["bare"]
    print(f"pva / bare step: {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}), "
          f"peak memory {results['pva']['peak_gb'] / results['bare']['peak_gb']:.3f}")  # fmt: skip
    if "pva2" in results:
        scaling = (2 * step["pva"]) / step["pva2"]
        print(f"2 processes: {scaling:.2f}x the samples/s of 1 (2.0 = perfect scaling)")
    if results["bare"]["device"] == "cuda":
        hours = 50_000 * step["pva"] / 3600
        print(f"50k steps at this batch per GPU: {hours:.1f} h on 1 GPU; about {hours / 8:.1f} h on 8 GPUs "
              "(the global batch grows 8x; keep the number of samples, not steps, to compare)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pretraining_speed-{results['bare']['device']}-{args.size}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=2))
    print(f"written {out.relative_to(RESULTS.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
