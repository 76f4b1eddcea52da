#!/usr/bin/env python3
"""Detect, align and embed every face of a dataset of people once, for pretraining.

    python scripts/preprocess_faces.py --data /data/people --facenet models/facenet/20180402-114759-vggface2.pt \
        --cache /data/people-faces --workers 4

--data is a folder per person (root/<person>/<photo>.jpg, optional <photo>.txt captions and
split.json) or a CelebAHQ-IDI export (root/IDI/...). A stopped run continues where it stopped;
photos without a face and unreadable files are skipped and counted in <cache>/report.json.

Several processes or machines share the work with --shard i/n, all with the same --cache (a
shared filesystem): each makes the people of its shard (a hash of the person's name, the same
on every machine), writes <cache>/reports/shard-<i>-of-<n>.json, and the last one to finish
writes <cache>/report.json for the whole dataset. pretrain.py reads the cache as if one run had
made it.

    python scripts/preprocess_faces.py --data /data/people --facenet facenet.pt --cache /shared/faces --shard 0/4
    ...                                                                                  --shard 3/4
    torchrun --nproc-per-node 8 scripts/preprocess_faces.py --data ... --cache ... --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pack's pva/

from pva.errors import PVAError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the dataset folder")
    parser.add_argument("--layout", default="auto", choices=["auto", "folders", "celebahq-idi"])
    parser.add_argument("--facenet", required=True, help="FaceNet weights (.pt or .safetensors)")
    parser.add_argument("--cache", required=True, help="where the face cache goes (reused by later runs)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (default: the cores shared among the workers); fix it for a "
        "cache that is the same bytes on every machine",
    )
    parser.add_argument("--threshold", type=float, default=0.9, help="MTCNN face probability threshold")
    parser.add_argument("--min-face-size", type=int, default=40, help="ignore faces smaller than this (px)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device for detection and FaceNet, e.g. cuda (under torchrun / accelerate launch, "
        "cuda is cuda:$LOCAL_RANK)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="make only shard I of N of the people (0 <= I < N), into the same --cache as the other "
        "shards; default: $RANK/$WORLD_SIZE when a launcher (torchrun, accelerate launch) set them, "
        "else the whole dataset",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pva.data.datasets import open_dataset
    from pva.data.preprocess import (
        PreprocessSettings,
        parse_shard,
        preprocess_dataset,
        shard_from_environment,
        shard_of,
        shard_report_file,
        shards_waited_for,
    )

    try:
        shard = parse_shard(args.shard) if args.shard is not None else shard_from_environment()
        if shard is not None and shard[1] == 1:
            shard = None
        device = args.device
        if device == "cuda" and shard is not None and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"  # a launcher's process per GPU
        dataset = open_dataset(args.data, layout=args.layout)
        print(dataset.describe(), flush=True)
        settings = PreprocessSettings(
            facenet=Path(args.facenet),
            threshold=args.threshold,
            min_face_size=args.min_face_size,
            workers=args.workers,
            device=device,
            threads=args.threads,
        )
        total = len(dataset.people)
        if shard is not None:
            total = sum(shard_of(name, shard[1]) == shard[0] for name in dataset.people)
            print(f"shard {shard[0]}/{shard[1]}: {total} of the {len(dataset.people)} people", flush=True)
        with tqdm(total=total, desc="people") as progress:
            report = preprocess_dataset(
                dataset,
                args.cache,
                settings,
                on_person=lambda r: progress.update(r.people - progress.n),
                shard=shard,
            )
    except PVAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.text())
    whole = Path(args.cache) / "report.json"
    if shard is None:
        print(f"report: {whole}")
        return 0
    print(f"shard report: {shard_report_file(args.cache, shard)}")
    waiting = shards_waited_for(args.cache, shard)
    if waiting:
        print(
            f"report.json for the whole dataset is written by the last shard to finish; waiting for "
            f"shard(s) {', '.join(str(i) for i in waiting)} of {shard[1]}"
        )
    else:
        print(f"every shard is done: report for the whole dataset: {whole}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
