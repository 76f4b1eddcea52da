#!/usr/bin/env python3
"""Detect, align and embed every face of a dataset of people once, for pretraining.

    python scripts/preprocess_faces.py --data /data/people --facenet models/facenet/20180402-114759-vggface2.pt \
        --cache /data/people-faces --workers 4

--data is a folder per person (root/<person>/<photo>.jpg, optional <photo>.txt captions and
split.json) or a CelebAHQ-IDI export (root/IDI/...). A stopped run continues where it stopped;
photos without a face and unreadable files are skipped and counted in <cache>/report.json.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--device", default="cpu", help="torch device for detection and FaceNet, e.g. cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pva.data.datasets import open_dataset
    from pva.data.preprocess import PreprocessSettings, preprocess_dataset

    try:
        dataset = open_dataset(args.data, layout=args.layout)
        print(dataset.describe(), flush=True)
        settings = PreprocessSettings(
            facenet=Path(args.facenet),
            threshold=args.threshold,
            min_face_size=args.min_face_size,
            workers=args.workers,
            device=args.device,
            threads=args.threads,
        )
        with tqdm(total=len(dataset.people), desc="people") as progress:
            report = preprocess_dataset(
                dataset, args.cache, settings, on_person=lambda r: progress.update(r.people - progress.n)
            )
    except PVAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.text())
    print(f"report: {Path(args.cache) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
