"""Dataset preprocessing for pretraining: every face found, aligned and embedded once.

The cache (one folder):
    people/<person>.safetensors   per person: FaceNet embeddings [P, 512] and of the mirror
                                  images [P, 512], the aligned 160 px crops [P, 3, 160, 160] (uint8,
                                  for stage 2, which trains FaceNet); its header holds the photos
                                  used (key, box, 5 landmarks, probability, photo size), the photos
                                  skipped and why, and the fingerprint of the settings and photos
    report.json                   counts for the whole dataset
Each person's file is written atomically as soon as that person is done, so a crashed or stopped
run resumes where it stopped; a file made with other settings (another FaceNet, threshold, ...) or
for other photos is made again. Photos without a face and unreadable files are skipped and
counted; people with fewer than 2 usable photos are counted and left out of training.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import PVAError
from ..faces.detection import DetectedFace, DetectionSettings, Faces, find_faces
from ..faces.embeddings import embed_photos
from ..files import make_writable_folder, save_safetensors, write_atomically, write_json_atomically
from .datasets import FaceDataset, Person
from .photos import read_photo

CACHE_FORMAT = 1
MIN_PHOTOS = 2  # a person needs a target and at least one other photo as reference
PEOPLE_DIR = "people"


@dataclass(frozen=True)
class PreprocessSettings:
    facenet: Path  # FaceNet weights (.pt / .safetensors)
    threshold: float = 0.9
    min_face_size: int = 40  # px; smaller faces are too blurry to learn a person from
    workers: int = 1
    device: str = "cpu"
    # torch threads per worker process; 0: the machine's cores shared among the workers. The
    # thread count changes how sums are split, so a fixed one gives the same cache on any machine.
    threads: int = 0

    def fingerprint(self) -> str:
        """What a cached embedding depends on: the FaceNet weights and the detection settings."""
        digest = hashlib.sha256(f"{CACHE_FORMAT}:{self.threshold}:{self.min_face_size}".encode())
        _hash_file(digest, self.facenet)
        return digest.hexdigest()[:24]


def facenet_digest(path: str | os.PathLike) -> str:
    """sha256 of a FaceNet weights file: which FaceNet made a cache's embeddings."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def _hash_file(digest, path: str | os.PathLike):  # noqa: ANN001, ANN202
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


@dataclass
class PreprocessReport:
    people: int = 0
    people_usable: int = 0
    people_too_few_photos: int = 0
    people_reused: int = 0  # found in the cache, not processed again
    people_damaged: int = 0  # their cache file was damaged (truncated, foreign): made again
    photos: int = 0
    photos_usable: int = 0
    photos_without_face: int = 0
    photos_unreadable: int = 0
    photos_with_several_faces: int = 0  # the largest face was used
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few skipped photos per reason

    def add(self, summary: dict, reused: bool) -> None:
        self.people += 1
        self.people_reused += reused
        usable = len(summary["photos"])
        self.people_usable += usable >= MIN_PHOTOS
        self.people_too_few_photos += usable < MIN_PHOTOS
        self.photos += usable + sum(len(v) for v in summary["skipped"].values())
        self.photos_usable += usable
        self.photos_without_face += len(summary["skipped"]["no_face"])
        self.photos_unreadable += len(summary["skipped"]["unreadable"])
        self.photos_with_several_faces += sum(p["faces_found"] > 1 for p in summary["photos"])
        for reason, keys in summary["skipped"].items():
            self.examples.setdefault(reason, [])
            self.examples[reason] += keys[: 5 - len(self.examples[reason])]

    def text(self) -> str:
        return (
            f"{self.people} people: {self.people_usable} usable, {self.people_too_few_photos} with fewer than "
            f"{MIN_PHOTOS} usable photos (left out); {self.photos} photos: {self.photos_usable} usable, "
            f"{self.photos_without_face} without a face, {self.photos_unreadable} unreadable, "
            f"{self.photos_with_several_faces} with several faces (largest used); "
            f"{self.people_reused} people reused from the cache, {self.people_damaged} damaged cache files made again"
        )


@dataclass(frozen=True)
class PersonFaces:
    """One person's usable photos, as training reads them."""

    name: str
    keys: tuple[str, ...]
    faces: tuple[DetectedFace, ...]  # in photo coordinates
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each photo
    embeddings: torch.Tensor  # [P, 512]
    mirrored: torch.Tensor  # [P, 512]
    path: Path
    facenet: str = ""  # facenet_digest of the FaceNet that made the embeddings ("" in older caches)

    def __len__(self) -> int:
        return len(self.keys)

    def crops(self, indices: Iterable[int]) -> torch.Tensor:
        """The aligned crops FaceNet saw, standardized for it, [len(indices), 3, 160, 160]."""
        with safe_open(str(self.path), framework="pt") as f:
            stored = f.get_slice("crops")
            pixels = torch.stack([stored[i] for i in indices])
        return (pixels.float() - 127.5) / 128


def person_file(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PEOPLE_DIR / f"{name}.safetensors"


def _photos_fingerprint(person: Person) -> str:
    digest = hashlib.sha256()
    for photo in person.photos:
        stat = photo.path.stat()
        digest.update(f"{photo.key}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class DamagedCacheFile(Exception):
    """A face-cache file that cannot be what preprocessing wrote; the message says what is wrong."""


def read_person_file(path: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The summary, embeddings and mirrored embeddings of one person's cache file, checked:
    DamagedCacheFile when it is truncated, another kind of file, or inconsistent."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "comfyui-pva-faces":
                raise DamagedCacheFile("not a face-cache file of this pack (no 'comfyui-pva-faces' header)")
            summary = json.loads(metadata.get("summary", "null"))
            embeddings, mirrored = f.get_tensor("embeddings"), f.get_tensor("mirrored")
            crops = tuple(f.get_slice("crops").get_shape())
    except DamagedCacheFile:
        raise
    except ValueError as error:  # json
        raise DamagedCacheFile(f"its header is damaged ({error})") from None
    except Exception as error:  # safetensors' own error types: a pickle, a truncated copy, ...
        raise DamagedCacheFile(f"cannot be read as a .safetensors file ({error})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("photos"), list):
        raise DamagedCacheFile("its header has no list of photos")
    count = len(summary["photos"])
    expected = {"embeddings": (count, 512), "mirrored": (count, 512), "crops": (count, 3, 160, 160)}
    found = {"embeddings": tuple(embeddings.shape), "mirrored": tuple(mirrored.shape), "crops": crops}
    for name, shape in expected.items():
        if found[name] != shape:
            raise DamagedCacheFile(f"{name} has shape {list(found[name])} for {count} photos")
    if not (torch.isfinite(embeddings).all() and torch.isfinite(mirrored).all()):
        raise DamagedCacheFile("its embeddings are not finite numbers")
    return summary, embeddings, mirrored


def _cached_summary(path: Path, fingerprint: str) -> tuple[dict | None, bool]:
    """(The header of a finished person file made with these settings and photos, or None;
    whether a file was there but damaged, and is to be made again.)"""
    if not path.is_file():
        return None, False
    try:
        summary, _, _ = read_person_file(path)
    except DamagedCacheFile:
        return None, True
    return (summary if summary.get("fingerprint") == fingerprint else None), False


def _process_person(
    name: str, photos: list[tuple[str, str]], fingerprint: str, out: Path, settings: dict
) -> dict:
    """Detect, align and embed one person's photos and write their file."""
    facenet = _worker_facenet(settings)
    detection = DetectionSettings(
        threshold=settings["threshold"],
        min_face_size=settings["min_face_size"],
        device=torch.device(settings["device"]),
    )
    skipped: dict[str, list[str]] = {"no_face": [], "unreadable": []}
    found = []  # (key, photo, the faces in it)
    for key, path in photos:
        try:
            pixels = read_photo(path)[None]
        except Exception:  # PIL raises many kinds for damaged or foreign files
            skipped["unreadable"].append(key)
            continue
        faces = find_faces(pixels, detection, what=key)
        if faces.count:
            found.append((key, pixels[0], faces.photos[0]))
        else:
            skipped["no_face"].append(key)
    used, tensors = [], {}
    if found:
        # one FaceNet batch for the whole person, the largest face of each photo
        faces = Faces(tuple(photo_faces for _, _, photo_faces in found))
        result = embed_photos([p for _, p, _ in found], facenet, faces=faces, selection=(0,), mirrored=True)
        for (key, pixels, photo_faces), face in zip(found, (f for _, f in result.faces.pairs()), strict=True):
            used.append(
                {
                    "key": key,
                    "box": list(face.box),
                    "landmarks": [list(p) for p in face.landmarks],
                    "probability": face.probability,
                    "size": [int(pixels.shape[0]), int(pixels.shape[1])],
                    "faces_found": len(photo_faces.faces),
                }
            )
        tensors = {
            "embeddings": result.embeddings,
            "mirrored": result.mirrored,
            "crops": (result.crops * 128 + 127.5).round().clamp(0, 255).to(torch.uint8),
        }
    else:
        tensors = {
            "embeddings": torch.zeros(0, 512),
            "mirrored": torch.zeros(0, 512),
            "crops": torch.zeros(0, 3, 160, 160, dtype=torch.uint8),
        }
    summary = {
        "person": name,
        "fingerprint": fingerprint,
        "facenet": settings["facenet_digest"],
        "photos": used,
        "skipped": skipped,
    }
    metadata = {
        "format": "comfyui-pva-faces",
        "format_version": str(CACHE_FORMAT),
        "summary": json.dumps(summary),
    }
    write_atomically(
        out, lambda temp: save_safetensors({k: v.contiguous() for k, v in tensors.items()}, temp, metadata)
    )
    return summary


_facenet_per_worker: dict = {}


def _worker_facenet(settings: dict) -> torch.nn.Module:
    key = (settings["facenet"], settings["device"])
    if key not in _facenet_per_worker:
        from ..faces.facenet import load_facenet_model

        _facenet_per_worker[key] = load_facenet_model(settings["facenet"]).to(settings["device"])
    return _facenet_per_worker[key]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_job(job: tuple) -> dict:
    return _process_person(*job)


def preprocess_dataset(
    dataset: FaceDataset,
    cache_dir: str | os.PathLike,
    settings: PreprocessSettings,
    on_person: Callable[[PreprocessReport], None] | None = None,
) -> PreprocessReport:
    """Fill the cache for every person of the dataset (all splits: validation and evaluation
    read it too), reusing what an earlier run finished; write report.json."""
    cache_dir = Path(cache_dir)
    if not Path(settings.facenet).is_file():
        raise PVAError(
            f"facenet: {settings.facenet} not found; give the FaceNet weights file (.pt or .safetensors)."
        )
    make_writable_folder(cache_dir, "cache")
    (cache_dir / PEOPLE_DIR).mkdir(exist_ok=True)
    fingerprint = settings.fingerprint()
    worker_settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    worker_settings["facenet_digest"] = facenet_digest(settings.facenet)
    report = PreprocessReport()
    jobs = []
    for person in dataset.people.values():
        person_fingerprint = f"{fingerprint}:{_photos_fingerprint(person)}"
        out = person_file(cache_dir, person.name)
        cached, damaged = _cached_summary(out, person_fingerprint)
        report.people_damaged += damaged
        if cached is not None:
            report.add(cached, reused=True)
            continue
        photos = [(p.key, str(p.path)) for p in person.photos]
        jobs.append((person.name, photos, person_fingerprint, out, worker_settings))
    if settings.workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads or threads)
        try:
            for job in jobs:
                report.add(_run_job(job), reused=False)
                if on_person:
                    on_person(report)
        finally:
            torch.set_num_threads(threads)
    else:
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with context.Pool(settings.workers, initializer=_worker_init, initargs=(threads,)) as pool:
            # in the dataset's order (not as they finish): the report is the same every time
            for summary in pool.imap(_run_job, jobs):
                report.add(summary, reused=False)
                if on_person:
                    on_person(report)
    write_json_atomically(cache_dir / "report.json", asdict(report))
    return report


def load_faces(cache_dir: str | os.PathLike, people: Iterable[str]) -> dict[str, PersonFaces]:
    """The cached faces of `people` with at least MIN_PHOTOS usable photos."""
    cache_dir = Path(cache_dir)
    loaded = {}
    missing = []
    for name in people:
        path = person_file(cache_dir, name)
        if not path.is_file():
            missing.append(name)
            continue
        try:
            summary, embeddings, mirrored = read_person_file(path)
            photos = summary["photos"]
            faces = tuple(
                DetectedFace(tuple(p["box"]), tuple(tuple(q) for q in p["landmarks"]), p["probability"])
                for p in photos
            )
            keys, sizes = tuple(p["key"] for p in photos), tuple(tuple(p["size"]) for p in photos)
        except (DamagedCacheFile, KeyError, TypeError, ValueError) as error:
            what = (
                error if isinstance(error, DamagedCacheFile) else f"a photo's entry is incomplete ({error!r})"
            )
            raise PVAError(
                f"{path}: {what}; run scripts/preprocess_faces.py again with the same --cache, which "
                "makes damaged files again."
            ) from None
        if len(photos) < MIN_PHOTOS:
            continue
        loaded[name] = PersonFaces(
            name, keys, faces, sizes, embeddings, mirrored, path, summary.get("facenet", "")
        )
    if missing:
        raise PVAError(
            f"cache {cache_dir}: {len(missing)} people of the dataset were never preprocessed (e.g. {missing[0]!r}); "
            "run scripts/preprocess_faces.py on this dataset first."
        )
    return loaded
