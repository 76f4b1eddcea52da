"""Personalization without a pretrained PVA model, side by side with a LoRA of the same budget.

On the synthetic world of the test harness (tests/harness/pretraining.py: a tiny SD1.5-inpainting
UNet taught to inpaint 120 synthetic people whose identity is their face tint; its 24 held-out
people were seen neither by the base nor by the pretrained PVA model). For each of --people
held-out people and each --seeds: train on 3 of their photos, measure on the 4th.

Text: the CLIP-L text encoder of the SD1.5-inpainting layout (the small test checkpoint, random
weights) encodes 'photo of embedding:<token> person'; methods without a trained token read the same
prompt with the token at its class word ('person'), so every method starts from the same
conditioning (tests/harness/from_scratch.py, shared with the acceptance test).

  none         the base alone
  pva          PVA from 'Initialize' (never pretrained), PVA parameters only
  pva+token    the same + the person token: the recipe 'auto' picks for such a model
  token        the person token alone (textual inversion; the identity path off)
  pretrained   the harness's pretrained PVA model (world-identity-model) + its steps, PVA only
  lora         ComfyUI core's LoRA trainer (TrainLoraNode: rank 16 on every linear and conv layer,
               AdamW at its default 5e-4, MSE), the same photos, masks and inpainting conditioning,
               as many steps as fit in the wall-clock pva+token took for the same step count

Figures per method and step count (mean over people and seeds, with the range):
  gain     held-out face-region loss of `none` / the method's, on the person's own held-out photo
           (fixed noise and timesteps; > 1 is better than the base)
  control  the same for the model trained on this person, measured on another held-out person's
           photo with that person's references: what is not specific to the person
  specific on each person's held-out photo, the loss of the model trained on another person / that
           of the model trained on this person (> 1: the model learned *this* person; 1 for
           'none', and for any method that learns nothing person-specific)
  s/step   training seconds per step; peak RSS of the method's process (each method runs alone)

Pictures (a second table): each model inpaints the held-out photo's face (20 ancestral steps, CFG 3,
3 noise seeds; the world's decoder, whose faces a recognizer can tell apart); FaceNet (the world's
calibrated weights, the features PVA reads) and dlib's ResNet (independent of PVA) give the cosine of
the picture's face to the photo's; `specific` is that minus the similarity of what the model
trained on another person paints of the same photo; `structure` is the face region's error once
each colour's mean is removed (the tint is the identity here; lower is better).

    python bench/personalization_from_scratch.py [--people 4] [--seeds 0 1] [--steps 40 100 200 400]
                                                [--methods ...] [--jobs 2]

Written to bench/results/personalization_from_scratch.json; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METHODS = ("none", "pva", "pva+token", "token", "pretrained", "lora")
PRETRAINED_STEPS = 40


def parse_args(argv=None):  # noqa: ANN001, ANN201
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=4, help="held-out people of the world")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 100, 200, 400])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="PVA parameters (the world's measured rate)"
    )
    parser.add_argument("--token-learning-rate", type=float, default=2e-2)
    parser.add_argument("--time-bins", type=int, default=4)
    parser.add_argument("--mirror", action="store_true", help="PVA/token methods: flip augmentation")
    parser.add_argument("--jobs", type=int, default=2, help="methods run in this many processes at once")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # one method in this process
    # JSON: the LoRA's wall-clock budget per person/seed/steps (pva+token's seconds)
    parser.add_argument("--lora-seconds", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "personalization_from_scratch.json")
    return parser.parse_args(argv)


# -- the world ----------------------------------------------------------------------------------
def world(args):  # noqa: ANN001, ANN201
    """harness.from_scratch's world, imported the way the tests import it."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from harness.host import import_comfy_on_cpu

    import_comfy_on_cpu()
    from harness.from_scratch import FromScratchWorld

    return FromScratchWorld(args.people)


def train_lora(bench, data, seed: int, steps: int):  # noqa: ANN001, ANN201
    """ComfyUI core's TrainLoraNode on the same inpainting inputs: (trained MODEL, seconds)."""
    import comfy_extras.nodes_train as core_training  # ComfyUI's own LoRA trainer (not the pack's code)
    import torch

    from pva.training.personalize import encode_inpaint_targets

    targets = encode_inpaint_targets(data, bench.vae, bench.positive(None))
    started = time.perf_counter()
    with torch.inference_mode(False):
        result = core_training.TrainLoraNode.execute(
            model=[bench.model], latents=[{"samples": latent} for _, latent in targets],
            positive=[cond for cond, _ in targets], batch_size=[1], steps=[steps], grad_accumulation_steps=[1],
            learning_rate=[5e-4], rank=[16], optimizer=["AdamW"], loss_function=["MSE"], seed=[seed],
            training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False],
            existing_lora=["[None]"],
        )  # fmt: skip
    return result.result[0], time.perf_counter() - started


# -- measuring ------------------------------------------------------------------------------------
def measure_method(bench, args, method: str) -> list[dict]:  # noqa: ANN001
    """Rows (person, seed, steps, own, other, seconds) of one method."""
    from harness.from_scratch import PictureScores, held_out_loss, held_out_pictures, train, training_photos
    from harness.pretraining import identity_model

    from pva.method.weights import load_pva
    from pva.training.personalize import TOKEN_ONLY, TrainingSettings

    rows = []
    people = list(bench.people)
    score = PictureScores(bench)
    budgets = json.loads(args.lora_seconds) if args.lora_seconds else {}
    rates: dict[int, float] = {}  # the LoRA trainer's seconds per step, per seed
    for seed in args.seeds:
        for index, person in enumerate(people):
            other = people[(index + 1) % len(people)]  # the control: another held-out person
            own_data, other_data = bench.people[person], bench.people[other]
            train_data = training_photos(own_data)
            start = bench.fresh_pva(seed)
            if method == "none":
                models = {0: ((bench.model, start), 0.0, 0)}
                # the recognizers' scale: another photo of the same person, and another person
                scale = dict(
                    same=score([own_data.pixels[0]], own_data), other=score([other_data.pixels[-1]], own_data)
                )
            elif method == "lora":
                models = {}
                for steps in args.steps:
                    if seed not in rates:
                        rates[seed] = train_lora(bench, train_data, seed, 20)[1] / 20
                    budget = budgets[f"{person}/{seed}/{steps}"]
                    lora_steps = max(1, round(budget / rates[seed]))
                    model, used = train_lora(bench, train_data, seed, lora_steps)
                    models[steps] = ((model, start), used, lora_steps)
            else:
                token = bench.start_token() if method in ("pva+token", "token") else None
                origin = load_pva(identity_model(bench.world)) if method == "pretrained" else start
                keep_at = [PRETRAINED_STEPS] if method == "pretrained" else args.steps
                settings = TrainingSettings(
                    steps=max(keep_at), learning_rate=args.learning_rate, time_bins=args.time_bins, seed=seed,
                    token_learning_rate=args.token_learning_rate, train=TOKEN_ONLY if method == "token" else "both", mirror=args.mirror,
                )  # fmt: skip
                snapshots = train(bench, origin, token, train_data, settings, keep_at)
                models = {n: ((bench.model, pva), seconds, n) for n, (pva, seconds) in snapshots.items()}
            identity = method not in ("none", "lora", "token")
            for steps, ((model, pva), seconds, trained_steps) in models.items():
                own = held_out_loss(bench, model, pva, own_data, identity)
                control = held_out_loss(bench, model, pva, other_data, identity)
                pictures = score(held_out_pictures(bench, model, pva, own_data, identity), own_data)
                control_pictures = score(
                    held_out_pictures(bench, model, pva, other_data, identity), other_data
                )
                rows.append(dict(method=method, person=person, other=other, seed=seed, steps=steps,
                                 trained_steps=trained_steps, own=own, other_loss=control, seconds=seconds,
                                 pictures=pictures, other_pictures=control_pictures))  # fmt: skip
                if method == "none":
                    rows[-1]["scale"] = scale
                print(f"[{method}] {person} seed {seed} steps {steps}: own {own:.5f} other {control:.5f} "
                      f"pictures {pictures} ({seconds:.1f} s)", flush=True)  # fmt: skip
    return rows


# -- the table -----------------------------------------------------------------------------------
def summarize(rows: list[dict], peaks: dict[str, float]) -> list[dict]:
    baseline = {(r["person"], r["seed"]): r for r in rows if r["method"] == "none"}
    table = []
    for method in METHODS:
        for steps in sorted({r["steps"] for r in rows if r["method"] == method}):
            picked = [r for r in rows if r["method"] == method and r["steps"] == steps]
            gains = [baseline[r["person"], r["seed"]]["own"] / r["own"] for r in picked]
            controls = [_other_baseline(baseline, r) / r["other_loss"] for r in picked]
            seconds = [r["seconds"] / max(r["trained_steps"], 1) for r in picked]
            own = {(r["person"], r["seed"]): r["own"] for r in picked}
            specific = [r["other_loss"] / own[r["other"], r["seed"]] for r in picked]
            seed_spread = {
                name: _seed_spread(picked, values)
                for name, values in (("gain", gains), ("specific", specific))
            }
            table.append(dict(
                method=method, steps=steps, gain=_mean(gains), gain_range=[min(gains), max(gains)],
                control=_mean(controls), control_range=[min(controls), max(controls)],
                specific=_mean(specific), specific_range=[min(specific), max(specific)],
                seed_spread=seed_spread, seconds_per_step=_mean(seconds),
                peak_rss_gib=peaks.get(method), runs=len(picked), pictures=_picture_figures(picked),
            ))  # fmt: skip
    return table


def _picture_figures(picked: list[dict]) -> dict:
    """Per recognizer: the mean similarity of the pictures of each person's held-out photo to
    the photo, its seed spread, and `specific`: that similarity minus the one of the pictures
    the model trained on another person paints of the same photo; the mean structure error."""
    own = {(r["person"], r["seed"]): r["pictures"] for r in picked}
    figures = {}
    for name in ("facenet", "dlib"):
        values = [r["pictures"][name] for r in picked]
        specific = [own[r["other"], r["seed"]][name] - r["other_pictures"][name] for r in picked]
        figures[name] = dict(
            similarity=_mean(values), seed_spread=_seed_spread(picked, values),
            specific=_mean(specific), specific_spread=_seed_spread(picked, specific),
        )  # fmt: skip
    figures["structure"] = _mean([r["pictures"]["structure"] for r in picked])
    return figures


def _other_baseline(baseline: dict, row: dict) -> float:
    """The base's loss on the control photo (the base's row of the same person measured it)."""
    return baseline[row["person"], row["seed"]]["other_loss"]


def _seed_spread(rows: list[dict], values: list[float]) -> float:
    """Range of the per-seed means (what another seed may move the figure by)."""
    by_seed: dict[int, list[float]] = {}
    for row, value in zip(rows, values, strict=True):
        by_seed.setdefault(row["seed"], []).append(value)
    means = [_mean(v) for v in by_seed.values()]
    return max(means) - min(means)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def scale_line(rows: list[dict]) -> str:
    """Mean similarity of each held-out photo to another photo of the person and to another
    person's photo: what the picture similarities are on."""
    scales = [r["scale"] for r in rows if "scale" in r]
    parts = [
        f"{name} {_mean([s['same'][name] for s in scales]):.4f} (same person) vs "
        f"{_mean([s['other'][name] for s in scales]):.4f} (another person)"
        for name in ("facenet", "dlib")
    ]
    return "recognizers' scale, photo to photo: " + "; ".join(parts)


def print_table(table: list[dict]) -> None:
    print(f"\n{'method':<11} {'steps':>5} {'gain':>7} {'range':>15} {'control':>8} {'range':>15} {'specific':>8} {'range':>15} {'spreads':>13} {'s/step':>7} {'peak GiB':>8}")  # fmt: skip
    for row in table:
        gain, control, specific = row["gain_range"], row["control_range"], row["specific_range"]
        peak = f"{row['peak_rss_gib']:.2f}" if row["peak_rss_gib"] else "-"
        print(
            f"{row['method']:<11} {row['steps']:>5} {row['gain']:>7.4f} {gain[0]:>7.4f}..{gain[1]:<6.4f} "
            f"{row['control']:>8.4f} {control[0]:>7.4f}..{control[1]:<6.4f} "
            f"{row['specific']:>8.4f} {specific[0]:>7.4f}..{specific[1]:<6.4f} {row['seed_spread']['gain']:>6.4f}/{row['seed_spread']['specific']:<6.4f} "
            f"{row['seconds_per_step']:>7.3f} {peak:>8}"
        )
    print(
        "\npictures of the held-out photos (similarity to the photo; specific: minus that of the other person's model)"
    )
    print(f"{'method':<11} {'steps':>5} {'FaceNet':>8} {'spread':>7} {'specific':>9} {'spread':>7} {'dlib':>8} {'spread':>7} {'specific':>9} {'spread':>7} {'structure':>9}")  # fmt: skip
    for row in table:
        f, d = row["pictures"]["facenet"], row["pictures"]["dlib"]
        print(
            f"{row['method']:<11} {row['steps']:>5} {f['similarity']:>8.4f} {f['seed_spread']:>7.4f} {f['specific']:>+9.4f} "
            f"{f['specific_spread']:>7.4f} {d['similarity']:>8.4f} {d['seed_spread']:>7.4f} {d['specific']:>+9.4f} "
            f"{d['specific_spread']:>7.4f} {row['pictures']['structure']:>9.5f}"
        )


# -- processes -------------------------------------------------------------------------------------
def run_one(args) -> int:  # noqa: ANN001
    rows = measure_method(world(args), args, args.method)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"rows": rows, "peak_rss_gib": peak}))
    return 0


def spawn(args, method: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:  # noqa: ANN001
    command = [sys.executable, __file__, "--method", method, "--people", str(args.people),
               "--seeds", *map(str, args.seeds), "--steps", *map(str, args.steps),
               "--learning-rate", str(args.learning_rate), "--token-learning-rate", str(args.token_learning_rate),
               "--time-bins", str(args.time_bins), *(["--mirror"] if args.mirror else []), *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def collect(process: subprocess.Popen, method: str) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{method}: the measuring process failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:  # noqa: ANN001
    args = parse_args(argv)
    if args.method:
        return run_one(args)
    wanted = set(args.methods) | {"none"} | ({"pva+token"} if "lora" in args.methods else set())
    # pva+token first: the LoRA's budget is its wall-clock; then the rest, `jobs` at a time
    pending = [m for m in ("pva+token", "none", "pva", "pretrained", "token", "lora") if m in wanted]
    results, running = {}, {}
    while pending or running:
        ready = [m for m in pending if m != "lora" or "pva+token" in results]
        while ready and len(running) < args.jobs:
            method = ready.pop(0)
            pending.remove(method)
            extra = ()
            if method == "lora":
                budgets = {
                    f"{r['person']}/{r['seed']}/{r['steps']}": r["seconds"]
                    for r in results["pva+token"]["rows"]
                }
                extra = ("--lora-seconds", json.dumps(budgets))
            running[method] = spawn(args, method, extra)
        finished = next((m for m, p in running.items() if p.poll() is not None), None)
        if finished is None:
            time.sleep(2)
            continue
        results[finished] = collect(running.pop(finished), finished)
    rows = [row for method in results.values() for row in method["rows"]]
    table = summarize(rows, {m: r["peak_rss_gib"] for m, r in results.items()})
    print_table(table)
    if any("scale" in r for r in rows):
        print(scale_line(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "table": table, "rows": rows}, indent=1))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
