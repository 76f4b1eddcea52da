"""Start-up at data-set scale: what preprocessing, the dataset index, the face cache and the
pretraining samples cost in time and memory before the first training step, at 100k people.

It builds (in a temporary folder, or --root) a dataset in the folder-per-person layout with
--people people of --photos photos each, and its face cache as scripts/preprocess_faces.py
writes it, then runs each stage in a fresh process and prints its wall time and the process's
peak RSS (resource.getrusage ru_maxrss: everything that process held, its imports and the
stages it needs first included):

  a  preprocessing start-up with everything cached: preprocess_dataset deciding that every
     person is reused (how long a run of scripts/preprocess_faces.py takes before its first job)
  b  open_dataset: indexing the folders
  c  load_faces for the train split (after b in the same process)
  d  PretrainingSamples for the train split, and the first --samples samples' indices through
     StepSampler, each sample's person, target and references drawn as __getitem__ draws them
     (no photo is read: the photos are tiny stand-ins)

The photos are 8x8 PNGs (hard links to a few files: a million photos cost directory entries,
not disk blocks); each person's cache file has random unit embeddings and a header like
preprocessing's (boxes, landmarks, probabilities, photo sizes, fingerprints), and its crops
tensor is a hole in a sparse file (the same bytes as zeros, without 77 GB of disk). The bench
checks that its writer gives the same bytes as the pack's own (pva.files.save_safetensors).
The figures are with a warm page cache (the files were just written or read); on a network
filesystem every stat and open costs more.

    python bench/dataset_scale.py [--people 100000] [--photos 10] [--root DIR] [--stages abcd]

--root keeps the built dataset there (and reuses it when it is already built for the same
--people/--photos): a second measurement, e.g. after a change to the pack, skips the build.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = {
    "a": "preprocessing start-up, all cached",
    "b": "open_dataset",
    "c": "load_faces (train split)",
    "d": "PretrainingSamples + first samples",
}
FACENET_BYTES = 107 * 2**20  # the size of facenet-pytorch's vggface2 weights: hashed at start-up
PHOTO_POOL = 64  # distinct photo files the photos are hard links to (ext4: < 65000 links each)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--photos", type=int, default=10, help="photos per person")
    parser.add_argument("--root", help="build (or reuse) the dataset here and keep it")
    parser.add_argument("--stages", default="abcd", help="which stages to measure (letters a-d)")
    parser.add_argument("--samples", type=int, default=100, help="samples drawn in stage d")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # a child process: one stage
    args = parser.parse_args(argv)
    if args.people < 10 or args.photos < 2:
        parser.error("--people must be at least 10 and --photos at least 2")
    if not args.stages or set(args.stages) - set(STAGES):
        parser.error(f"--stages: letters from {''.join(STAGES)}, got {args.stages!r}")
    return args


# -- the dataset and its face cache -------------------------------------------------------------
def person_name(index: int) -> str:
    return f"person-{index:06d}"


def _tensor_layout(photos: int) -> list[tuple[str, str, list[int], int]]:
    """(name, dtype, shape, bytes) of a person file's tensors, in the order safetensors stores them."""
    return [
        ("embeddings", "F32", [photos, 512], photos * 512 * 4),
        ("mirrored", "F32", [photos, 512], photos * 512 * 4),
        ("crops", "U8", [photos, 3, 160, 160], photos * 3 * 160 * 160),
    ]


def write_person_file(path: Path, metadata: dict[str, str], embeddings, mirrored) -> None:  # noqa: ANN001
    """The bytes pva.files.save_safetensors writes for these tensors and zero crops; the crops
    are left a hole (a sparse file), so a million photos' crops take no disk."""
    photos = embeddings.shape[0]
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, dtype, shape, size in _tensor_layout(photos):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + embeddings.tobytes() + mirrored.tobytes())
        f.truncate(8 + len(encoded) + offset)


def _check_writer(folder: Path) -> None:
    """The bench's writer gives the same bytes as the pack's for the same tensors and header."""
    import numpy as np
    import torch

    from pva.files import save_safetensors

    rng = np.random.default_rng(1)
    embeddings, mirrored = (rng.standard_normal((3, 512), dtype=np.float32) for _ in range(2))
    metadata = {"format": "comfyui-pva-faces", "format_version": "1", "summary": json.dumps({"a": [1.5]})}
    ours, theirs = folder / "ours.safetensors", folder / "theirs.safetensors"
    write_person_file(ours, metadata, embeddings, mirrored)
    tensors = {
        "embeddings": torch.from_numpy(embeddings),
        "mirrored": torch.from_numpy(mirrored),
        "crops": torch.zeros(3, 3, 160, 160, dtype=torch.uint8),
    }
    save_safetensors(tensors, theirs, metadata)
    if ours.read_bytes() != theirs.read_bytes():
        raise SystemExit("the bench's person-file writer no longer matches pva.files.save_safetensors")
    ours.unlink()
    theirs.unlink()


def _photo_entry(rng, key: str) -> dict:  # noqa: ANN001
    """A used photo's entry as preprocessing records it (floats at full precision, as MTCNN's)."""
    side = float(rng.uniform(180, 420))
    x, y = float(rng.uniform(200, 400)), float(rng.uniform(150, 350))
    box = [x, y, x + side, y + side * float(rng.uniform(1.1, 1.3))]
    landmarks = [
        [x + side * float(rng.uniform(0.2, 0.8)), y + side * float(rng.uniform(0.3, 0.9))] for _ in range(5)
    ]
    return {
        "key": key,
        "box": box,
        "landmarks": landmarks,
        "probability": float(rng.uniform(0.99, 1.0)),
        "size": [1024, 1024],
        "faces_found": 1,
    }


def build(root: Path, people: int, photos: int) -> None:
    import numpy as np
    from PIL import Image

    from pva.data.datasets import Person, Photo
    from pva.data.preprocess import CACHE_FORMAT, PreprocessSettings, facenet_digest, person_file
    from pva.data.preprocess import _photos_fingerprint as photos_fingerprint

    data, cache, pool = root / "people", root / "faces", root / "pool"
    for folder in (data, cache / "people", pool):
        folder.mkdir(parents=True)
    _check_writer(root)
    rng = np.random.default_rng(0)
    sources = []
    for k in range(PHOTO_POOL):
        sources.append(pool / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sources[-1])
    facenet = root / "facenet.pt"
    with open(facenet, "wb") as f:
        for _ in range(FACENET_BYTES // 2**20):
            f.write(rng.bytes(2**20))
    fingerprint = PreprocessSettings(facenet=facenet).fingerprint()
    digest = facenet_digest(facenet)
    start = time.perf_counter()
    for index in range(people):
        name = person_name(index)
        folder = data / name
        folder.mkdir()
        keys = []
        for k in range(photos):
            os.link(sources[(index * photos + k) % PHOTO_POOL], folder / f"{k:02d}.png")
            keys.append(f"{name}/{k:02d}.png")
        person = Person(name, tuple(Photo(folder / Path(key).name, key) for key in keys))
        summary = {
            "person": name,
            "fingerprint": f"{fingerprint}:{photos_fingerprint(person)}",
            "facenet": digest,
            "photos": [_photo_entry(rng, key) for key in keys],
            "skipped": {"no_face": [], "unreadable": []},
        }
        metadata = {
            "format": "comfyui-pva-faces",
            "format_version": str(CACHE_FORMAT),
            "summary": json.dumps(summary),
        }
        embeddings, mirrored = (rng.standard_normal((photos, 512), dtype=np.float32) for _ in range(2))
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        mirrored /= np.linalg.norm(mirrored, axis=1, keepdims=True)
        write_person_file(person_file(cache, name), metadata, embeddings, mirrored)
        if (index + 1) % 10_000 == 0:
            print(f"  built {index + 1} people ({time.perf_counter() - start:.0f} s)", flush=True)
    (root / "built.json").write_text(json.dumps({"people": people, "photos": photos}))


# -- one stage, in a fresh process ---------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    import torch

    from pva.data.datasets import open_dataset
    from pva.data.preprocess import PreprocessSettings, load_faces, preprocess_dataset

    torch.set_num_threads(1)
    root = Path(args.root)
    data, cache = root / "people", root / "faces"
    result: dict = {"stage": args.stage}
    timed, timed_cpu = time.perf_counter(), _cpu_seconds()
    dataset = open_dataset(data)
    result["open_dataset_s"] = time.perf_counter() - timed
    result["people"], result["photos"] = (
        len(dataset.people),
        sum(len(p.photos) for p in dataset.people.values()),
    )
    before = _rss_mib()
    start, cpu = time.perf_counter(), _cpu_seconds()
    if args.stage == "a":
        report = preprocess_dataset(dataset, cache, PreprocessSettings(facenet=root / "facenet.pt"))
        assert report.people_reused == len(dataset.people), f"not everything was reused: {report.text()}"
    elif args.stage == "b":  # the stage is open_dataset itself, timed above
        start, before, cpu = timed, None, timed_cpu
    elif args.stage == "c":
        faces = load_faces(cache, dataset.splits["train"])
        result["people"] = len(faces)
        result["photos"] = sum(len(p) for p in faces.values())
    elif args.stage == "d":
        from pva.pretraining.samples import PretrainingSamples, SampleSettings, StepSampler

        train = dataset.splits["train"]
        faces = load_faces(cache, train)
        result["load_faces_s"] = time.perf_counter() - start
        start, before, cpu = time.perf_counter(), _rss_mib(), _cpu_seconds()
        samples = PretrainingSamples(dataset, faces, train, SampleSettings(), seed=0)
        drawn = 0
        for indices in StepSampler(0, args.samples, 1, 1, 1, 0):
            for index in indices:
                rng = samples.rng(index)  # what __getitem__ draws, bar reading the photo
                person = samples.faces[samples.people[rng.randrange(len(samples.people))]]
                target = rng.randrange(len(person))
                samples.references(person, target, rng)
                drawn += 1
        result["people"], result["photos"] = len(samples.people), len(samples.photos)
        result["samples"] = drawn
    result["seconds"] = time.perf_counter() - start
    result["cpu_s"] = _cpu_seconds() - cpu
    result["rss_before_mib"] = before
    result["peak_mib"] = _peak_mib()
    return result


def run_stage(args, root: Path, stage: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--root",
        str(root),
        "--stage",
        stage,
        "--samples",
        str(args.samples),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        print(json.dumps(child(args)))
        return 0
    temporary = None
    if args.root:
        root = Path(args.root)
        built = root / "built.json"
        if built.is_file() and json.loads(built.read_text()) != {
            "people": args.people,
            "photos": args.photos,
        }:
            raise SystemExit(
                f"--root {root} holds another dataset ({built.read_text().strip()}); give another"
            )
    else:
        temporary = tempfile.mkdtemp(prefix="pva-dataset-scale-")
        root = Path(temporary)
    try:
        if not (root / "built.json").is_file():
            if root.exists() and any(root.iterdir()):
                raise SystemExit(
                    f"--root {root} is not empty and holds no built dataset; give an empty folder"
                )
            print(f"building {args.people} people x {args.photos} photos in {root} ...", flush=True)
            start = time.perf_counter()
            build(root, args.people, args.photos)
            print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for stage in args.stages:
            rows.append(run_stage(args, root, stage))
            print(json.dumps(rows[-1]), flush=True)
        print()
        print(
            f"{'stage':<38} {'people':>8} {'photos':>9} {'seconds':>8} {'cpu s':>7} {'peak MiB':>9} "
            f"{'MiB before':>10}"
        )
        for row in rows:
            before = row.get("rss_before_mib")
            print(
                f"{row['stage'] + ' ' + STAGES[row['stage']]:<38} {row['people']:>8} {row['photos']:>9} "
                f"{row['seconds']:>8.2f} {row['cpu_s']:>7.2f} {row['peak_mib']:>9.0f} "
                f"{'' if before is None else f'{before:.0f}':>10}"
            )
        print(
            "seconds: the stage's own call (wall); cpu s: its user + system CPU time (the figure to compare "
            "on a busy machine); peak MiB: the stage's process (imports and, for a, c and d, open_dataset "
            "first); MiB before: its RSS when the stage began. people, photos: what the stage handled "
            "(d: the train people, and every photo of the dataset, which PretrainingSamples indexes)"
        )
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
