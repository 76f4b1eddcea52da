"""How much parallel visual attention costs in a full-size SD1.5-inpainting UNet forward.

Builds one UNet with the exact SD1.5-inpainting layout (ComfyUI's own classes, random weights,
about 860 M parameters) and, for each image size, times one forward pass at batch 2 of:

  plain          the unpatched model (ComfyUI's own attention)
  pva both       apply_identity(..., 10 tokens, strength 1, scope "both"): every sample uses PVA
  pva positive   scope "positive" with cond_or_uncond=[1, 0]: only the cond half uses PVA
  reference      "pva both" with the fused parallel_attention swapped for the written-out
                 parallel_attention_reference (explicit score matrices, two matmuls + softmax)

Variants are interleaved (one forward of each per repeat, round-robin, the starting variant
rotating between repeats) after one warm-up forward each; the median is reported. Target: patched / plain <= 1.05.

    python bench/attention_speed.py [--sizes 256 512] [--batch 2] [--repeats 3]
                                    [--device auto|cpu] [--dtype fp32|fp16|bf16]

--device auto lets comfy pick (CUDA on a GPU machine; the CPU where there is no accelerator).
Timings on a shared machine are only as good as its idle cores: the load average is recorded.
Results go to bench/results/attention_speed-<device>[-<N>threads].json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
TARGET = 1.05
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default="auto",
        help="auto: let comfy pick (CPU when there is no accelerator)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="UNet weight dtype")
    parser.add_argument("--tokens", type=int, default=10, help="identity tokens")
    parser.add_argument(
        "--flops", action="store_true", help="also count one forward's FLOPs (plain, pva both)"
    )
    args = parser.parse_args(argv)
    if any(size % 8 for size in args.sizes):
        parser.error("--sizes must be multiples of 8")
    return args


def import_comfy(device: str) -> None:
    """Put the host ComfyUI and this repo on sys.path; on `cpu`, force comfy onto the CPU."""
    sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]
    from harness.host import comfyui_path

    sys.path.insert(0, str(comfyui_path()))
    import comfy.cli_args

    if device == "cpu" or not _has_accelerator():
        comfy.cli_args.args.cpu = True  # comfy would otherwise insist on CUDA and fail
    import comfy.model_management  # noqa: F401  (fixes the device now)


def build_unet(torch_device, dtype):
    """A ModelPatcher around a BaseModel with the SD1.5-inpainting UNet, random weights, on device."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from harness.models import SD15_INPAINT_UNET, fill_random

    config = comfy.supported_models.SD15(dict(SD15_INPAINT_UNET, num_head_channels=-1))
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, device=None)
    model.set_inpaint()
    fill_random(model.diffusion_model, seed=0)
    model.diffusion_model.to(torch_device)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch_device, offload_device=torch_device)


def _has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu is not None and xpu.is_available())
    )


@contextmanager
def reference_attention():
    """Swap the fused call that ParallelCrossAttention makes for the written-out formula."""
    import pva.method.patching
    from pva.method.attention import parallel_attention_reference

    fused = pva.method.patching.parallel_attention
    pva.method.patching.parallel_attention = parallel_attention_reference
    try:
        yield
    finally:
        pva.method.patching.parallel_attention = fused


@contextmanager
def nothing():
    yield


def make_variants(patcher, pva_model, tokens):
    from pva.method.patching import apply_identity

    both = apply_identity(patcher, pva_model, tokens, strength=1.0, scope="both")
    positive = apply_identity(patcher, pva_model, tokens, strength=1.0, scope="positive")
    cfg = {"cond_or_uncond": [1, 0]}  # sample 0 is uncond, sample 1 cond (as in CFG sampling)
    return {
        "plain": (patcher, {}, nothing),
        "pva both": (both, {}, nothing),
        "pva positive": (positive, cfg, nothing),
        "reference": (both, {}, reference_attention),
    }


def forward(torch, patcher, inputs, options, swap, cuda: bool) -> dict:
    """One timed UNet forward: wall and process-CPU seconds; on CUDA the peak memory and the peak
    above what was allocated before the call (weights excluded: the activations' share)."""
    patcher.patch_model()
    try:
        with swap(), torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = patcher.model.diffusion_model(**inputs, transformer_options=dict(options))
            if cuda:
                torch.cuda.synchronize()
            run = dict(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
            del out
    finally:
        patcher.unpatch_model()
    if cuda:
        run["peak_bytes"] = torch.cuda.max_memory_allocated()
        run["activation_peak_bytes"] = run["peak_bytes"] - before
    return run


def flop_counter(torch):
    """torch's FlopCounterMode, also counting scaled_dot_product_attention where it runs as one op
    (on the CPU it does, and torch has no formula for it there)."""
    from torch.utils import flop_counter

    def sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    aten = torch.ops.aten
    mapping = {
        aten.scaled_dot_product_attention: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
    }
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(torch, patcher, inputs, options, swap) -> int:
    patcher.patch_model()
    try:
        with swap(), torch.inference_mode(), flop_counter(torch) as counter:
            patcher.model.diffusion_model(**inputs, transformer_options=dict(options))
    finally:
        patcher.unpatch_model()
    return counter.get_total_flops()


def summarize(size: int, latent: int, batch: int, runs: dict[str, list[dict]], cuda: bool) -> list[dict]:
    """One row per variant: medians over the repeats and ratios against the plain model."""

    def median(name, key):
        return statistics.median(r[key] for r in runs[name])

    rows = []
    for name, run in runs.items():
        row = dict(size=size, latent=latent, batch=batch, variant=name)
        row["times_s"] = [r["seconds"] for r in run]
        row["cpu_times_s"] = [r["cpu_seconds"] for r in run]
        row["median_s"] = median(name, "seconds")
        row["ratio"] = row["median_s"] / median("plain", "seconds")
        row["median_cpu_s"] = median(name, "cpu_seconds")
        row["cpu_ratio"] = row["median_cpu_s"] / median("plain", "cpu_seconds")
        if cuda:
            for key in ("peak_bytes", "activation_peak_bytes"):
                row[key] = max(r[key] for r in run)
                plain = max(r[key] for r in runs["plain"])
                row[key.replace("bytes", "ratio")] = row[key] / plain if plain else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import_comfy(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention
    import comfy.model_management

    from pva.method.model import PVAModel

    load_start = os.getloadavg()[0]
    torch_device = comfy.model_management.get_torch_device()
    cuda = torch_device.type == "cuda"
    dtype = getattr(torch, DTYPES[args.dtype])
    device_name = torch.cuda.get_device_name(torch_device) if cuda else platform.processor() or "cpu"
    attention = comfy.ldm.modules.attention.optimized_attention.__name__
    print(
        f"device {torch_device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load_start:.2f}, dtype {args.dtype}, comfy attention {attention}",
        flush=True,
    )

    start = time.perf_counter()
    patcher = build_unet(torch_device, dtype)
    unet = patcher.model.diffusion_model
    params = sum(p.numel() for p in unet.parameters())
    pva_model = PVAModel.initialize_from(patcher, num_tokens=args.tokens, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = pva_model.encode(torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1))
    variants = make_variants(patcher, pva_model, tokens)
    print(
        f"SD1.5-inpainting UNet: {params:,} parameters ({params / 1e6:.1f} M), "
        f"{len(pva_model.layers)} cross-attention layers, identity tokens {tuple(tokens.shape)}; "
        f"built in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    results = []
    for size in args.sizes:
        latent = size // 8
        inputs = dict(
            x=torch.randn(args.batch, unet.in_channels, latent, latent, generator=generator).to(
                torch_device, dtype
            ),
            timesteps=torch.linspace(300.0, 700.0, args.batch).to(torch_device),
            context=torch.randn(args.batch, 77, 768, generator=generator).to(torch_device, dtype),
        )
        runs = {name: [] for name in variants}
        for name, (variant, options, swap) in variants.items():  # warm-up (fills PVA's caches)
            run = forward(torch, variant, inputs, options, swap, cuda)
            print(f"  {size}px warm-up {name}: {run['seconds']:.2f} s", flush=True)
        names = list(variants)
        for repeat in range(args.repeats):
            # round-robin, starting one variant later each repeat: no variant always follows another
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                variant, options, swap = variants[name]
                runs[name].append(forward(torch, variant, inputs, options, swap, cuda))
            print(
                f"  {size}px repeat {repeat + 1} (load {os.getloadavg()[0]:.1f}): "
                + ", ".join(
                    f"{n} {r[-1]['seconds']:.2f} s ({r[-1]['cpu_seconds']:.1f} cpu)" for n, r in runs.items()
                ),
                flush=True,
            )
        results += summarize(size, latent, args.batch, runs, cuda)
        if args.flops:
            for row in results[-len(variants) :]:
                if row["variant"] in ("plain", "pva both"):
                    variant, options, swap = variants[row["variant"]]
                    row["gflops"] = count_flops(torch, variant, inputs, options, swap) / 1e9

    print()
    print(table(results, cuda))
    for size in args.sizes:
        counted = {r["variant"]: r["gflops"] for r in results if r["size"] == size and "gflops" in r}
        if len(counted) == 2:
            print(
                f"{size}px FLOPs: plain {counted['plain']:.1f} G, pva both {counted['pva both']:.1f} G "
                f"(x{counted['pva both'] / counted['plain']:.4f}: the overhead's lower bound)"
            )
    verdicts = {}
    for size in args.sizes:
        ratios = {r["variant"]: r["ratio"] for r in results if r["size"] == size}
        verdicts[size] = {v: ratios[v] <= TARGET for v in ("pva both", "pva positive")}
    print(
        f"\nTarget: patched / plain <= {TARGET:.2f} (median wall time): "
        + "; ".join(
            f"{size}px " + ", ".join(f"{v} {'met' if ok else 'NOT met'}" for v, ok in verdict.items())
            for size, verdict in verdicts.items()
        )
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.threads}threads" if args.threads else ""
    path = RESULTS / f"attention_speed-{torch_device.type}{suffix}.json"
    meta = dict(
        device=str(torch_device),
        device_name=device_name,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average_start=load_start,
        load_average_end=os.getloadavg()[0],
        dtype=args.dtype,
        comfy_attention=attention,
        unet_parameters=params,
        cross_attention_layers=len(pva_model.layers),
        identity_tokens=args.tokens,
        batch=args.batch,
        repeats=args.repeats,
        target_ratio=TARGET,
        target_met={str(size): verdict for size, verdict in verdicts.items()},
    )
    path.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
    print(f"results: {path}")
    return 0


def table(results: list[dict], cuda: bool) -> str:
    header = f"{'size':>5}  {'variant':<13} {'median s':>9} {'vs plain':>9} {'cpu s':>8} {'vs plain':>9}"
    if cuda:
        header += f" {'peak GiB':>9} {'vs plain':>9} {'act. MiB':>9} {'vs plain':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        line = (
            f"{r['size']:>5}  {r['variant']:<13} {r['median_s']:>9.3f} {r['ratio']:>9.3f}"
            f" {r['median_cpu_s']:>8.2f} {r['cpu_ratio']:>9.3f}"
        )
        if cuda:
            act_ratio = r["activation_peak_ratio"]
            line += (
                f" {r['peak_bytes'] / 2**30:>9.2f} {r['peak_ratio']:>9.3f}"
                f" {r['activation_peak_bytes'] / 2**20:>9.0f}"
                f" {act_ratio if act_ratio is not None else float('nan'):>9.3f}"
            )
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
