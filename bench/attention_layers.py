"""Where PVA's extra time goes: one SD1.5 cross-attention layer at a time, in isolation.

For every distinct cross-attention shape of the SD1.5 UNet at each image size (inner dim
320 / 640 / 1280, 8 heads, L = (size/8)^2, (size/16)^2, ... query tokens, 77 text tokens,
10 identity tokens, batch 2) it times, with torch.utils.benchmark (median of blocked runs):

  layer plain      ComfyUI's CrossAttention.forward (to_q/k/v, optimized_attention, to_out)
  layer both       ParallelCrossAttention.forward, one identity stream, scope "both"
  layer positive   the same, scope "positive" with cond_or_uncond=[1, 0] (uncond half: original attention)
  comfy attn       the attention core alone: comfy's optimized_attention (sub_quad on CPU)
  sdpa attn        the attention core through comfy's attention_pytorch (one SDPA call)
  fused both       pva.attention.parallel_attention, no bias
  fused positive   parallel_attention with a [B,1,1,1] 0/-inf bias
  reference        parallel_attention_reference (explicit scores + softmax)
  W'q x            the identity query projection F.linear(x, W'q) alone

and the FLOPs of the plain and patched layer (torch.utils.flop_counter). The weighted sum over
the UNet's 16 layers estimates the per-forward overhead that bench/attention_speed.py measures.

    python bench/attention_layers.py [--sizes 256 512] [--batch 2] [--device auto|cpu]
                                     [--dtype fp32|fp16|bf16] [--min-time 0.5]
                                     [--threads N] [--clock wall|cpu]

Results go to bench/results/attention_layers-<device>[-cpuclock].json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_speed import DTYPES, REPO_ROOT, RESULTS, flop_counter, import_comfy  # noqa: E402

TEXT_TOKENS = 77
CONTEXT_DIM = 768
HEADS = 8
# SD1.5: (inner dim, latent downsampling, cross-attention layers at that shape)
SD15_LAYERS = [(320, 1, 5), (640, 2, 5), (1280, 4, 5), (1280, 8, 1)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=10, help="identity tokens")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, robust to other load on a shared machine (use with --threads 1)",
    )
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of runs per measurement")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import_comfy(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management
    import comfy.ops
    import torch.nn.functional as F
    from harness.models import fill_random
    from torch.utils.benchmark import Timer

    from pva.method.attention import VisualKeys, parallel_attention, parallel_attention_reference
    from pva.method.layers import LayerSpec
    from pva.method.model import ParallelProjections
    from pva.method.patching import IdentityStream, ParallelCrossAttention

    class Projections(torch.nn.Module):  # the part of PVAModel that IdentityStream uses
        def __init__(self, spec):
            super().__init__()
            self.proj = ParallelProjections(spec)

        def projections_for(self, name):
            return self.proj

    device = comfy.model_management.get_torch_device()
    dtype = getattr(torch, DTYPES[args.dtype])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def median_seconds(fn) -> float:
        def call():
            fn()
            sync()

        with torch.inference_mode():
            call()  # warm-up (and PVA's projection cache)
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads(), timer=clock)
            return timer.blocked_autorange(min_run_time=args.min_time).median

    def flops(fn) -> int:
        with torch.inference_mode(), flop_counter(torch) as counter:
            fn()
        return counter.get_total_flops()

    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}, dtype {args.dtype}, clock {args.clock}, "
        f"comfy attention {comfy_attention.optimized_attention.__name__}",
        flush=True,
    )

    def measure(size, inner, down, count) -> dict:
        side = size // 8 // down
        length, batch = side * side, args.batch
        spec = LayerSpec("layer", inner, CONTEXT_DIM, inner, HEADS)
        original = comfy_attention.CrossAttention(
            inner, CONTEXT_DIM, heads=HEADS, dim_head=inner // HEADS, operations=comfy.ops.disable_weight_init
        )
        projections = Projections(spec)
        fill_random(original, seed=1)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(projections.proj, name).weight.copy_(getattr(original, name).weight)
        original.to(device, dtype).eval()
        tokens = torch.randn(1, args.tokens, CONTEXT_DIM, generator=generator)
        both = ParallelCrossAttention(original, "layer", (IdentityStream(projections, tokens, scope="both"),))
        positive = ParallelCrossAttention(
            original, "layer", (IdentityStream(projections, tokens, scope="positive"),)
        )
        cfg = {"cond_or_uncond": [1, 0]}

        x, context = rand(batch, length, inner), rand(batch, TEXT_TOKENS, CONTEXT_DIM)
        q, k, v = rand(batch, length, inner), rand(batch, TEXT_TOKENS, inner), rand(batch, TEXT_TOKENS, inner)
        stream = VisualKeys(
            rand(batch, length, inner), rand(1, args.tokens, inner), rand(1, args.tokens, inner)
        )
        bias = torch.tensor([-torch.inf, 0.0], device=device).repeat_interleave(batch // 2 or 1)[:batch]
        masked = VisualKeys(stream.query, stream.key, stream.value, bias.view(batch, 1, 1, 1))
        w_q = rand(inner, inner)

        cases = {
            "layer plain": lambda: original(x, context=context),
            "layer both": lambda: both(x, context=context, transformer_options={}),
            "layer positive": lambda: positive(x, context=context, transformer_options=cfg),
            "comfy attn": lambda: comfy_attention.optimized_attention(q, k, v, HEADS),
            "sdpa attn": lambda: comfy_attention.attention_pytorch(q, k, v, HEADS),
            "fused both": lambda: parallel_attention(q, k, v, [stream], HEADS),
            "fused positive": lambda: parallel_attention(q, k, v, [masked], HEADS),
            "reference": lambda: parallel_attention_reference(q, k, v, [stream], HEADS),
            "W'q x": lambda: F.linear(x, w_q),
        }
        row = dict(size=size, inner=inner, heads=HEADS, length=length, layers=count, batch=batch)
        row["seconds"] = {name: median_seconds(fn) for name, fn in cases.items()}
        row["gflops"] = {
            name: flops(cases[name]) / 1e9
            for name in ("layer plain", "layer both", "comfy attn", "fused both")
        }
        s = row["seconds"]
        print(
            f"{size:>4}px inner {inner:>4} L {length:>5} x{count}: "
            + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in s.items())
            + f" | GFLOP plain {row['gflops']['layer plain']:.3f} both {row['gflops']['layer both']:.3f}",
            flush=True,
        )
        return row

    rows = [measure(size, *layer) for size in args.sizes for layer in SD15_LAYERS]
    print()
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-cpuclock" if args.clock == "cpu" else ""
    path = RESULTS / f"attention_layers-{device.type}{suffix}.json"
    meta = dict(
        device=str(device), torch=torch.__version__, threads=torch.get_num_threads(), dtype=args.dtype
    )
    meta["comfy_attention"] = comfy_attention.optimized_attention.__name__
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"results: {path.relative_to(REPO_ROOT)}")
    return 0


def table(rows: list[dict]) -> str:
    names = list(rows[0]["seconds"])
    header = f"{'size':>4} {'inner':>5} {'L':>5} {'n':>2} " + " ".join(f"{n:>14}" for n in names)
    lines = ["per-layer median ms", header, "-" * len(header)]
    for r in rows:
        cells = " ".join(f"{r['seconds'][n] * 1e3:>14.2f}" for n in names)
        lines.append(f"{r['size']:>4} {r['inner']:>5} {r['length']:>5} {r['layers']:>2} {cells}")
    lines.append("")
    lines.append("per UNet forward (16 layers, weighted): ms, and patched layer - plain layer")
    for size in sorted({r["size"] for r in rows}):
        sub = [r for r in rows if r["size"] == size]
        total = {n: sum(r["seconds"][n] * r["layers"] for r in sub) * 1e3 for n in names}
        flops = {n: sum(r["gflops"][n] * r["layers"] for r in sub) for n in sub[0]["gflops"]}
        lines.append(
            f"{size:>4}px: "
            + ", ".join(f"{n} {t:.1f}" for n, t in total.items())
            + f" | extra both {total['layer both'] - total['layer plain']:+.1f} ms,"
            f" positive {total['layer positive'] - total['layer plain']:+.1f} ms"
            + f" | GFLOP layers plain {flops['layer plain']:.2f} both {flops['layer both']:.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
