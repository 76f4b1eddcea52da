"""Seconds and peak memory of one quick-personalization step vs a bare UNet forward+backward.

Both variants use the same full-size SD1.5-inpainting UNet (ComfyUI's classes, random weights)
at the same batch (K = time_bins timesteps of one target) and each runs in its own process so
that its peak memory is its own:

  bare   the plain UNet, forward + backward + AdamW step, training only the cross-attention
         layers' to_k/to_v weights (the cheapest comparable fine-tune, Custom-Diffusion style)
  pva    pva.training.personalize.Personalizer: identity encoder + parallel projections trained through
         ComfyUI's cond batching, inpaint conditioning and model management

Target: pva step / bare step <= 1.2.

    python bench/personalization_speed.py [--size 256] [--steps 3] [--time-bins 4]
                                          [--device auto|cpu] [--dtype fp32|fp16|bf16]
                                          [--gradient-checkpointing]
"""

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_speed import DTYPES, RESULTS, build_unet, import_comfy  # noqa: E402

TARGET = 1.2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="training crop size in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--time-bins", type=int, default=4)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variant", choices=["bare", "pva"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_memory_gb(torch, device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB


def run_bare(torch, patcher, args, device, phases=None) -> list[float]:  # noqa: ANN001
    unet = patcher.model.diffusion_model
    unet.requires_grad_(False)
    trainable = [
        getattr(m, p).weight for n, m in unet.named_modules() if n.endswith("attn2") for p in ("to_k", "to_v")
    ]
    for weight in trainable:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    latent = args.size // 8
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.time_bins, 9, latent, latent, generator=generator).to(device, patcher.model_dtype())
    context = torch.randn(args.time_bins, 77, 768, generator=generator).to(device, patcher.model_dtype())
    timesteps = torch.linspace(100, 900, args.time_bins).to(device)
    target = torch.randn(args.time_bins, 4, latent, latent, generator=generator).to(device)
    times = []
    timed = phases or (lambda name: contextlib.nullcontext())  # pva.pretraining.phases.StepPhases
    for step in range(args.steps + 1):
        if step == 1 and phases is not None:
            phases.take()  # the warm-up step is not counted
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with timed("forward"):
            loss = (unet(x, timesteps, context).float() - target).pow(2).mean()
        with timed("backward"):
            loss.backward()
        with timed("optimizer"):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def run_pva(torch, patcher, args, device) -> list[float]:
    from harness.models import text_conditioning, tiny_vae
    from harness.people import synthetic_person

    from pva.method.model import PVAModel
    from pva.training.personalize import Personalizer, TrainingSettings, encode_inpaint_targets
    from pva.training.session import training_mode

    data = synthetic_person((0.8, 0.3, 0.3), seed=1, resolution=args.size)
    settings = TrainingSettings(
        steps=args.steps + 1, time_bins=args.time_bins, gradient_checkpointing=args.gradient_checkpointing
    )
    pva = PVAModel.initialize_from(patcher, seed=0)
    stamps = []
    with training_mode():
        targets = encode_inpaint_targets(data, tiny_vae(), text_conditioning(patcher))  # VAE not timed
        with Personalizer(patcher, pva, data, targets, settings) as run:
            start = time.perf_counter()

            def on_step(step: int, loss: float) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            run.train(on_step)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps, strict=True)]
    return times[1:]


def child(args) -> None:
    import_comfy(args.device)
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    # pva gets the UNet the way ComfyUI's loaders make it inside the executor: as inference
    # tensors (which personalization must read without copying); bare trains some of its
    # weights, so it needs normal ones.
    loading = torch.inference_mode() if args.variant == "pva" else torch.no_grad()
    with loading:
        patcher = build_unet(device, getattr(torch, DTYPES[args.dtype]))
    times = (run_bare if args.variant == "bare" else run_pva)(torch, patcher, args, device)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "device": device.type,
                "times": times,
                "peak_gb": peak_memory_gb(torch, device),
            }
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return 0
    results = {}
    for variant in ("bare", "pva"):
        command = [
            sys.executable,
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--variant",
            variant,
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    bare, pva = results["bare"], results["pva"]
    step = {k: sorted(v["times"])[len(v["times"]) // 2] for k, v in results.items()}
    ratio = step["pva"] / step["bare"]
    memory_ratio = pva["peak_gb"] / bare["peak_gb"]
    print(f"device {bare['device']}, {args.size}x{args.size}, batch {args.time_bins} (time bins), dtype {args.dtype}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")  # fmt: skip
    print(f"{'variant':<8}{'s/step (median)':>18}{'peak GiB':>12}")
    for name in ("bare", "pva"):
        print(f"{name:<8}{step[name]:>18.3f}{results[name]['peak_gb']:>12.2f}")
    print(
        f"pva / bare: time {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}), peak memory {memory_ratio:.3f}"
    )
    print(f"40 steps at this size: about {40 * step['pva']:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"personalization_speed-{bare['device']}-{args.size}.json"
    out.write_text(
        json.dumps(
            {"args": vars(args), "results": results, "ratio": ratio, "memory_ratio": memory_ratio}, indent=2
        )
    )
    print(f"written {out.relative_to(RESULTS.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
