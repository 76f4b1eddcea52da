"""How much parallel visual attention costs in a full-size SD1.5-inpainting UNet forward and in a
full-width Flux double-stream block.

Builds one UNet with the exact SD1.5-inpainting layout (ComfyUI's own classes, random weights,
about 860 M parameters) and, for each image size, times one forward pass at batch 2 of:

  plain          the unpatched model (ComfyUI's own attention)
  pva both       apply_identity(..., 10 tokens, strength 1, scope "both"): every sample uses PVA
  pva positive   scope "positive" with cond_or_uncond=[1, 0]: only the cond half uses PVA
  reference      "pva both" with the fused parallel_attention swapped for the written-out
                 parallel_attention_reference (explicit score matrices, two matmuls + softmax)

Variants are interleaved (one forward of each per repeat, round-robin, the starting variant
rotating between repeats) after one warm-up forward each; the median is reported. Target: patched / plain <= 1.05.

The DiT block (--models dit): Flux.1 with one full-width double-stream block (3072 wide, 24 heads,
random weights) at each --dit-sizes image size (4096 image + 512 text tokens at 1024 px), plain vs
Apply PVA (10 tokens, strength 1): median time, counted FLOPs, the FLOP lower bound (plain + what
PVA must compute whatever the implementation) and the activation peak (CUDA: allocator; CPU: the
resident high-water mark of a process of its own, meaningful only at sizes where activations
dominate, e.g. 1024).

    python bench/attention_speed.py [--sizes 256 512] [--batch 2] [--repeats 3]
                                    [--device auto|cpu] [--dtype fp32|fp16|bf16]
                                    [--models unet dit] [--dit-sizes 1024] [--pytorch-attention]

--device auto lets comfy pick (CUDA on a GPU machine; the CPU where there is no accelerator).
Timings on a shared machine are only as good as its idle cores: the load average is recorded.
Results go to bench/results/attention_speed-<device>[-<N>threads].json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
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
    parser.add_argument(
        "--models", nargs="+", choices=["unet", "dit"], default=["unet", "dit"],
        help="unet: the SD1.5-inpainting UNet; dit: one Flux double-stream block (full width)",
    )  # fmt: skip
    parser.add_argument(
        "--dit-sizes", type=int, nargs="+", default=[1024], help="image sizes for the Flux block (pixels)"
    )
    parser.add_argument("--dit-text", type=int, default=512, help="text tokens beside the image (Flux: 512)")
    parser.add_argument(
        "--pytorch-attention", action="store_true",
        help="plain attention through torch's SDPA, as on a GPU (ComfyUI's CPU default is sub-quadratic attention)",
    )  # fmt: skip
    parser.add_argument("--dit-memory-probe", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(size % 8 for size in args.sizes):
        parser.error("--sizes must be multiples of 8")
    return args


def import_comfy(device: str, pytorch_attention: bool = False) -> None:
    """Put the host ComfyUI and this repo on sys.path; on `cpu`, force comfy onto the CPU."""
    sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]
    from harness.host import comfyui_path

    sys.path.insert(0, str(comfyui_path()))
    import comfy.cli_args

    if device == "cpu" or not _has_accelerator():
        comfy.cli_args.args.cpu = True  # comfy would otherwise insist on CUDA and fail
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
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


def unet_bench(args, torch, torch_device, cuda: bool, dtype) -> tuple[list[dict], dict]:
    """The SD1.5-inpainting UNet: rows per size and variant, and what the JSON records of it."""
    from pva.method.model import PVAModel

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

    return results, dict(
        unet_parameters=params,
        cross_attention_layers=len(pva_model.layers),
        target_ratio=TARGET,
        target_met={str(size): verdict for size, verdict in verdicts.items()},
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import_comfy(args.device, args.pytorch_attention)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention
    import comfy.model_management

    if args.dit_memory_probe:
        return dit_memory_probe(args, torch, comfy.model_management.get_torch_device())
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

    results, meta = [], {}
    if "unet" in args.models:
        results, meta = unet_bench(args, torch, torch_device, cuda, dtype)
    dit = dit_bench(args, torch, torch_device, cuda, dtype) if "dit" in args.models else []

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
        identity_tokens=args.tokens,
        batch=args.batch,
        repeats=args.repeats,
        **meta,
    )
    path.write_text(json.dumps(dict(meta=meta, results=results, dit_block=dit), indent=2) + "\n")
    print(f"results: {path}")
    return 0


# -- the DiT block ------------------------------------------------------------------------------
FLUX_BLOCK = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000,
    qkv_bias=True, guidance_embed=True, patch_size=2,
)  # fmt: skip


def build_flux_block(torch, torch_device, dtype, tokens: int):
    """Flux.1 with one full-width double-stream block (3072 wide, 24 heads, random weights) and no
    single-stream blocks, the patched clone (apply_identity, strength 1) and the PVA model."""
    from harness.models import tiny_flux

    from pva.method.model import PVAModel
    from pva.method.patching import apply_identity

    plain = tiny_flux("flux", dtype=torch.float32, **FLUX_BLOCK)
    pva_model = PVAModel.initialize_from(plain, num_tokens=tokens, seed=0, encoder_depth=1)
    plain.model.to(torch_device, dtype)
    generator = torch.Generator().manual_seed(0)
    identity = pva_model.encode(
        torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1)
    )
    return plain, apply_identity(plain, pva_model, identity, scope="both"), pva_model


def dit_inputs(torch, args, size: int, torch_device, dtype) -> dict:
    generator = torch.Generator().manual_seed(1)
    latent = size // 8
    return dict(
        x=torch.randn(args.batch, 16, latent, latent, generator=generator).to(torch_device, dtype),
        timestep=torch.linspace(0.3, 0.7, args.batch).to(torch_device),
        context=torch.randn(args.batch, args.dit_text, 4096, generator=generator).to(torch_device, dtype),
        y=torch.randn(args.batch, 768, generator=generator).to(torch_device, dtype),
        guidance=torch.full((args.batch,), 3.5).to(torch_device),
    )


def dit_forward(torch, patcher, inputs, cuda: bool, count: bool = False) -> dict:
    """One forward as the sampler makes it (the patcher's options and wrappers): seconds, and on
    CUDA the peak memory above what was allocated before (the activations' share)."""
    import comfy.patcher_extension

    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        counter = flop_counter(torch) if count else nothing()
        start = time.perf_counter()
        with counter:
            patcher.model.diffusion_model(**inputs, transformer_options=options)
        if cuda:
            torch.cuda.synchronize()
        run = dict(seconds=time.perf_counter() - start)
    if count:
        run["flops"] = counter.get_total_flops()
    if cuda:
        run["activation_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    return run


def minimal_extra_flops(batch: int, image_tokens: int, tokens: int, hidden: int = 3072) -> int:
    """What PVA must compute beyond the plain block, whatever the implementation: the parallel
    query W'q x (2 B I C^2), the identity scores and their values (2 x 2 B I M C), the identity
    keys and values (2 x 2 M C^2) and the block's image modulation again (2 B C 6C)."""
    return (
        2 * batch * image_tokens * hidden * hidden
        + 4 * batch * image_tokens * tokens * hidden
        + 4 * tokens * hidden * hidden
        + 12 * batch * hidden * hidden
    )


def dit_memory_probe(args, torch, torch_device) -> int:
    """(Run in a process of its own.) Peak resident memory of one forward above the resident
    memory before it, for the CPU, where torch keeps no allocation statistics."""
    variant, size = args.dit_memory_probe[0], int(args.dit_memory_probe[1])
    dtype = getattr(torch, DTYPES[args.dtype])
    plain, patched, _ = build_flux_block(torch, torch_device, dtype, args.tokens)
    patcher = patched if variant == "pva" else plain
    inputs = dit_inputs(torch, args, size, torch_device, dtype)
    dit_forward(torch, patcher, inputs, cuda=False)  # first run: lazily made caches stay resident
    before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    dit_forward(torch, patcher, inputs, cuda=False)
    peak = _memory_kib("VmHWM")
    print(json.dumps(dict(activation_peak_bytes=(peak - before) * 1024, peak_bytes=peak * 1024)))
    return 0


def _memory_kib(field: str) -> int:
    """A line of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_in_own_process(args, variant: str, size: int) -> dict:
    command = [sys.executable, str(Path(__file__)), "--device", "cpu", "--dtype", args.dtype, "--batch", str(args.batch),
               *(["--pytorch-attention"] if args.pytorch_attention else []),
               "--tokens", str(args.tokens), "--dit-text", str(args.dit_text), "--dit-memory-probe", variant, str(size)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def dit_bench(args, torch, torch_device, cuda: bool, dtype) -> list[dict]:
    """Plain vs patched Flux block at each size: median time, activation peak, counted FLOPs, and
    the ratio against the FLOP lower bound."""
    start = time.perf_counter()
    plain, patched, pva_model = build_flux_block(torch, torch_device, dtype, args.tokens)
    params = sum(p.numel() for p in plain.model.diffusion_model.double_blocks.parameters())
    print(
        f"\nFlux double-stream block: {params / 1e6:.0f} M parameters, {args.tokens} identity tokens; "
        f"built in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    rows = []
    for size in args.dit_sizes:
        inputs = dit_inputs(torch, args, size, torch_device, dtype)
        image_tokens = (size // 16) ** 2
        variants = {"plain": plain, "pva": patched}
        flops = {
            name: dit_forward(torch, p, inputs, cuda, count=True)["flops"] for name, p in variants.items()
        }
        runs = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name in list(variants)[repeat % 2 :] + list(variants)[: repeat % 2]:
                runs[name].append(dit_forward(torch, variants[name], inputs, cuda))
            print(
                f"  {size}px ({image_tokens} image + {args.dit_text} text tokens) repeat {repeat + 1}: "
                + ", ".join(f"{n} {r[-1]['seconds']:.2f} s" for n, r in runs.items()),
                flush=True,
            )
        if cuda:
            memory = {
                n: {"activation_peak_bytes": max(r["activation_peak_bytes"] for r in runs[n])} for n in runs
            }
        else:
            memory = {n: _memory_in_own_process(args, n, size) for n in runs}
        median = {n: statistics.median(r["seconds"] for r in runs[n]) for n in runs}
        bound = (flops["plain"] + minimal_extra_flops(args.batch, image_tokens, args.tokens)) / flops["plain"]
        row = dict(
            size=size, image_tokens=image_tokens, text_tokens=args.dit_text, batch=args.batch,
            plain_s=median["plain"], pva_s=median["pva"], time_ratio=median["pva"] / median["plain"],
            plain_gflops=flops["plain"] / 1e9, pva_gflops=flops["pva"] / 1e9,
            flop_ratio=flops["pva"] / flops["plain"], flop_bound=bound,
            plain_activation_mib=(memory["plain"]["activation_peak_bytes"] or 0) / 2**20,
            pva_activation_mib=(memory["pva"]["activation_peak_bytes"] or 0) / 2**20,
        )  # fmt: skip
        row["vs_bound"] = row["time_ratio"] / bound
        row["memory_ratio"] = (
            row["pva_activation_mib"] / row["plain_activation_mib"] if row["plain_activation_mib"] else None
        )
        rows.append(row)
    print()
    header = f"{'size':>5} {'plain s':>8} {'pva s':>8} {'time x':>7} {'GFLOP x':>8} {'bound x':>8} {'time/bound':>10} {'act MiB plain':>13} {'pva':>7} {'x':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        memory_ratio = r["memory_ratio"] if r["memory_ratio"] is not None else float("nan")
        print(
            f"{r['size']:>5} {r['plain_s']:>8.3f} {r['pva_s']:>8.3f} {r['time_ratio']:>7.3f} {r['flop_ratio']:>8.4f}"
            f" {r['flop_bound']:>8.4f} {r['vs_bound']:>10.3f} {r['plain_activation_mib']:>13.0f}"
            f" {r['pva_activation_mib']:>7.0f} {memory_ratio:>6.2f}"
        )  # fmt: skip
    print("(time x: patched / plain median time; GFLOP x: counted FLOPs of what runs; bound x: plain + the least "
          "PVA must compute, over plain; time/bound: how far the patched block is from that bound)")  # fmt: skip
    return rows


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
