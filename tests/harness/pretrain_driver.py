"""Pretraining on the tiny base inside a real launcher (plain python, torchrun, accelerate), for
the distributed tests. Every process writes what it ended with:

    <out>/rank-<r>.safetensors   that process's trained PVA parameters
    <out>/rank-<r>.json          what accelerate saw: process count, index, distributed type

    python tests/harness/pretrain_driver.py --world DIR --out DIR --steps 3 --batch 2 --accumulation 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # the harness, and the pack's pva/


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--ema-decay", type=float, default=0.0)
    parser.add_argument("--resume")
    parser.add_argument("--latents", default="per-step", choices=["cached", "per-step"])
    parser.add_argument("--latents-dir", help="cached latents' folder (default: in --out)")
    parser.add_argument("--people", type=int, default=0, help="train on the first N training people (0: all)")
    args = parser.parse_args()

    from harness.host import import_comfy_on_cpu
    from pva.launch import make_accelerator

    accelerator = make_accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    import_comfy_on_cpu()
    import torch
    from safetensors.torch import save_file

    from harness.pretraining import World, tiny_base
    from pva.pretraining import latent_cache
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.run import pretrain
    from pva.pretraining.samples import SampleSettings

    torch.set_num_threads(1)  # two processes on two cores
    world = World(Path(args.world))
    out = Path(args.out)
    config = PretrainingConfig(
        output_dir=out / "run",
        max_steps=args.steps,
        batch_size=args.batch,
        gradient_accumulation=args.accumulation,
        time_bins=2,
        learning_rate=1e-4,
        encoder_learning_rate=1e-3,
        encoder_dropout=0.0,  # dropout masks depend on how a batch is split; the rest does not
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        validate_every=10**9,
        validation_samples=4,
        preview_samples=0,
        num_tokens=4,
        encoder_depth=1,
        loader_workers=0,
        samples=SampleSettings(resolution=64),
        latents=args.latents,
        latent_views=1,
        latent_masks=2,
        latents_dir=Path(args.latents_dir) if args.latents_dir else out / "latents",
    )
    dataset = world.dataset()
    if args.people:
        dataset = replace(dataset, splits=dict(dataset.splits, train=dataset.splits["train"][: args.people]))
    made = [0]  # the cache entries this process encoded
    original = latent_cache.write_person

    def counted(*parts):  # noqa: ANN002, ANN202
        made[0] += 1
        return original(*parts)

    latent_cache.write_person = counted
    result = pretrain(config, tiny_base(), dataset, world.faces(), accelerator, resume=args.resume)
    rank = accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.pva.state_dict().items()}
    save_file(state, str(out / f"rank-{rank}.safetensors"))
    seen = {
        "num_processes": accelerator.num_processes,
        "process_index": rank,
        "distributed_type": str(accelerator.distributed_type),
        "losses": result.losses,
        "validation": result.validation,
        "provenance": result.pva.provenance,
        "env_world_size": os.environ.get("WORLD_SIZE"),
        "latents_made": made[0],
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
