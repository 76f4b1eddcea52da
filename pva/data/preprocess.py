"""Dataset preprocessing for pretraining: every face found, aligned and embedded once.

The cache (one folder):
    people/<person>.safetensors   per person: FaceNet embeddings [P, 512] and of the mirror
                                  images [P, 512], the aligned 160 px crops [P, 3, 160, 160] (uint8,
                                  for stage 2, which trains FaceNet); its header holds the photos
                                  used (key, box, 5 landmarks, probability, photo size), the photos
                                  skipped and why, and the fingerprint of the settings and photos
    report.json                   counts for the whole dataset
    reports/shard-<i>-of-<n>.json a shard's counts (sharded runs only)
Each person's file is written atomically as soon as that person is done (a temporary
.<person>.safetensors-<random>.tmp beside it, renamed when complete), so a crashed, stopped or
killed run resumes where it stopped and never leaves a half-written entry; a file made with
other settings (another FaceNet, threshold, ...) or for other photos is made again. Photos
without a face and unreadable files are skipped and counted; people with fewer than 2 usable
photos are counted and left out of training.

Shards: several processes (on one machine, or on several machines sharing the cache folder)
each take a share of the people, `shard=(i, n)`: person p belongs to shard
int(sha256(p's name)[:8]) mod n, which depends on the name alone (not on the machine, the
listing order or the other people), so n processes given 0/n .. n-1/n together cover every
person exactly once and fill the same people/ folder an unsharded run fills. Each shard deletes
its own reports/shard-<i>-of-<n>.json when it starts and writes it (atomically) when it is done;
then it looks for all n shard reports made with the same settings for the same people, and
when they are all there (the last shard to finish sees them all) it writes report.json for the
whole dataset: their counts summed, the same report.json an unsharded run would write. Two
shards finishing together may both write it, the same content, each atomically. A run without
a shard reads every person file (everything reused) and writes report.json anew.
Readers (load_faces) see only finished person files, whichever process wrote them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
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
REPORTS_DIR = "reports"  # the shards' reports
EXAMPLES = 5  # skipped photos named per reason in a report


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
        return self._digests()[0]

    def _digests(self) -> tuple[str, str]:
        """(fingerprint(), facenet_digest(facenet)), the FaceNet file read once for both."""
        settings = hashlib.sha256(f"{CACHE_FORMAT}:{self.threshold}:{self.min_face_size}".encode())
        weights = hashlib.sha256()
        with open(self.facenet, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                settings.update(chunk)
                weights.update(chunk)
        return settings.hexdigest()[:24], weights.hexdigest()


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
            self.examples[reason] += keys[: EXAMPLES - len(self.examples[reason])]

    def text(self) -> str:
        return (
            f"{self.people} people: {self.people_usable} usable, {self.people_too_few_photos} with fewer than "
            f"{MIN_PHOTOS} usable photos (left out); {self.photos} photos: {self.photos_usable} usable, "
            f"{self.photos_without_face} without a face, {self.photos_unreadable} unreadable, "
            f"{self.photos_with_several_faces} with several faces (largest used); "
            f"{self.people_reused} people reused from the cache, {self.people_damaged} damaged cache files made again"
        )


# -- shards ---------------------------------------------------------------------------------------
def check_shard(shard: object, what: str = "shard") -> tuple[int, int]:
    """(i, n) checked: n >= 1 and 0 <= i < n; PVAError naming `what` otherwise."""
    if (
        not isinstance(shard, (tuple, list))
        or len(shard) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
    ):
        raise PVAError(f"{what}: expected (i, n), this process's shard i of n shards, got {shard!r}.")
    index, count = shard
    if count < 1:
        raise PVAError(
            f"{what}: {index}/{count} asks for {count} shards; give i/n with n >= 1 and 0 <= i < n, e.g. 0/4."
        )
    if not 0 <= index < count:
        raise PVAError(
            f"{what}: {index}/{count} names shard {index} of {count}, and the {count} shards are numbered "
            f"0 .. {count - 1} ({'0/1' if count == 1 else f'0/{count} .. {count - 1}/{count}'})."
        )
    return index, count


def parse_shard(text: str, what: str = "--shard") -> tuple[int, int]:
    """'i/n' as (i, n); PVAError naming `what` for anything else ('a/b', '3/2', '0/0')."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise PVAError(
            f"{what}: expected i/n, this process's shard i of n shards (0 <= i < n, e.g. 0/4 .. 3/4), "
            f"got {text!r}."
        )
    return check_shard((int(match[1]), int(match[2])), what)


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when a launcher (torchrun, accelerate launch) set them, else None."""
    environ = os.environ if environ is None else environ
    world = environ.get("WORLD_SIZE")
    if world is None:
        return None
    rank = environ.get("RANK")
    what = f"RANK={rank!r} and WORLD_SIZE={world!r} (set by torchrun / accelerate launch)"
    if rank is None:
        raise PVAError(f"{what}: WORLD_SIZE is set without RANK; unset it or give --shard i/n.")
    return parse_shard(f"{rank}/{world}", what)


def shard_of(name: str, shards: int) -> int:
    """The shard (0 .. shards - 1) person `name` belongs to: a hash of the name alone, the same
    on every machine and whatever the other people are."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % shards


def shard_report_file(cache_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    return Path(cache_dir) / REPORTS_DIR / f"shard-{shard[0]}-of-{shard[1]}.json"


def _people_digest(dataset: FaceDataset) -> str:
    """Which people a shard report is a share of."""
    return hashlib.sha256("\n".join(sorted(dataset.people)).encode("utf-8")).hexdigest()[:24]


def _example_positions(dataset: FaceDataset, examples: dict[str, list[str]]) -> dict[str, list]:
    """Each example's place in the dataset's order (people, then their photos): merging shards'
    examples by it names the photos an unsharded run names."""
    wanted = {key for keys in examples.values() for key in keys}
    found, position = {}, 0
    for person in dataset.people.values():
        for photo in person.photos:
            if photo.key in wanted:
                found[photo.key] = position
            position += 1
    return {reason: [[found[key], key] for key in keys] for reason, keys in examples.items()}


def _read_shard_report(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # not there (yet), or not one of ours: that shard is not done
    return data if isinstance(data, dict) else None


def _matching_shard_reports(cache_dir: Path, mine: dict) -> tuple[list[dict], list[int]]:
    """The reports of all shards of `mine`'s run made with its settings for its people, and the
    shards that have none (not finished, or finished with other settings or people)."""
    count = mine["shard"][1]
    reports, missing = [], []
    for index in range(count):
        data = _read_shard_report(shard_report_file(cache_dir, (index, count)))
        if (
            data is not None
            and data.get("shard") == [index, count]
            and data.get("settings") == mine["settings"]
            and data.get("people") == mine["people"]
            and isinstance(data.get("report"), dict)
        ):
            reports.append(data)
        else:
            missing.append(index)
    return reports, missing


def _merged(shard_reports: list[dict]) -> PreprocessReport:
    """The whole dataset's report from its shards' reports: counts summed, the examples that
    come first in the dataset's order."""
    merged = PreprocessReport()
    for f in fields(PreprocessReport):
        if f.name != "examples":
            setattr(merged, f.name, sum(int(r["report"].get(f.name, 0)) for r in shard_reports))
    positions: dict[str, list] = {}
    for data in shard_reports:
        for reason, entries in data.get("example_positions", {}).items():
            positions.setdefault(reason, []).extend(entries)
    merged.examples = {
        reason: [key for _, key in sorted(entries)[:EXAMPLES]] for reason, entries in positions.items()
    }
    return merged


def shards_waited_for(cache_dir: str | os.PathLike, shard: tuple[int, int]) -> list[int]:
    """After shard `shard` finished: the shards whose reports report.json still waits for
    (empty: every shard is done and report.json covers the whole dataset)."""
    mine = _read_shard_report(shard_report_file(cache_dir, shard))
    if mine is None:
        return list(range(shard[1]))
    return _matching_shard_reports(Path(cache_dir), mine)[1]


@dataclass(frozen=True)
class _PersonData:
    """What a person's cache file holds for training."""

    keys: tuple[str, ...]
    faces: tuple[DetectedFace, ...]
    sizes: tuple[tuple[int, int], ...]
    embeddings: torch.Tensor
    mirrored: torch.Tensor


class PersonFaces:
    """One person's usable photos, as training reads them: name, keys, faces (in photo
    coordinates), sizes ((height, width) of each photo), embeddings [P, 512], mirrored [P, 512]
    (of the mirror images), path (the cache file) and facenet (facenet_digest of the FaceNet
    that made the embeddings; "" in older caches).

    Made by load_faces, it holds only the name, the photo count and which file it is: keys,
    faces, sizes and the embeddings are read from the file when used (a few kB, the last few
    hundred people's kept in a small cache), so a dataset of 100k people does not hold
    gigabytes of embeddings and millions of face records in every process. Made with all of
    them given, it holds what it was given."""

    __slots__ = ("_count", "_facenet", "_held", "_identity", "_name", "_path")

    def __init__(
        self,
        name: str,
        keys: tuple[str, ...],
        faces: tuple[DetectedFace, ...],
        sizes: tuple[tuple[int, int], ...],
        embeddings: torch.Tensor,
        mirrored: torch.Tensor,
        path: Path,
        facenet: str = "",
    ):
        self._name, self._path, self._facenet = name, str(path), facenet
        self._held = _PersonData(tuple(keys), tuple(faces), tuple(sizes), embeddings, mirrored)
        self._count, self._identity = len(self._held.keys), None

    @classmethod
    def _from_file(cls, name: str, path: Path, facenet: str, count: int, identity: tuple) -> PersonFaces:
        person = cls.__new__(cls)
        person._name, person._path, person._facenet = name, str(path), sys.intern(facenet)
        person._count, person._identity, person._held = count, identity, None
        return person

    def __reduce__(self) -> tuple:  # (data-loader workers get a copy: the file's place, not its data)
        return _restore_person_faces, (
            self._name,
            self._path,
            self._facenet,
            self._count,
            self._identity,
            self._held,
        )

    def _data(self) -> _PersonData:
        return self._held if self._held is not None else _person_data(self._path, self._identity)

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return Path(self._path)

    @property
    def facenet(self) -> str:
        return self._facenet

    @property
    def keys(self) -> tuple[str, ...]:
        return self._data().keys

    @property
    def faces(self) -> tuple[DetectedFace, ...]:
        return self._data().faces

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return self._data().sizes

    @property
    def embeddings(self) -> torch.Tensor:
        return self._data().embeddings

    @property
    def mirrored(self) -> torch.Tensor:
        return self._data().mirrored

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"PersonFaces({self._name!r}, {self._count} photos, {self._path})"

    def crops(self, indices: Iterable[int]) -> torch.Tensor:
        """The aligned crops FaceNet saw, standardized for it, [len(indices), 3, 160, 160]."""
        if self._identity is not None and _file_identity(os.stat(self._path)) != self._identity:
            raise _changed_error(self._path)
        with safe_open(self._path, framework="pt") as f:
            stored = f.get_slice("crops")
            pixels = torch.stack([stored[i] for i in indices])
        return (pixels.float() - 127.5) / 128


def _restore_person_faces(
    name: str, path: str, facenet: str, count: int, identity: tuple | None, held: _PersonData | None
) -> PersonFaces:
    if held is not None:
        return PersonFaces(
            name, held.keys, held.faces, held.sizes, held.embeddings, held.mirrored, path, facenet
        )
    return PersonFaces._from_file(name, Path(path), facenet, count, identity)


def person_file(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PEOPLE_DIR / f"{name}.safetensors"


def _photos_fingerprint(person: Person) -> str:
    digest = hashlib.sha256()
    for photo in person.photos:
        stat = os.stat(photo.path)
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


# A person file's tensors: (dtype, bytes per element, shape after the photo count).
_TENSORS = {
    "embeddings": ("F32", 4, (512,)),
    "mirrored": ("F32", 4, (512,)),
    "crops": ("U8", 1, (3, 160, 160)),
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class _Header:
    summary: dict
    data_start: int  # where the tensors' bytes begin
    ranges: dict[str, tuple[int, int]]  # each tensor's bytes, from data_start
    identity: tuple[int, int, int, int]  # (device, inode, size, mtime): which file it was


def _file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _read_header(f) -> _Header:  # noqa: ANN001
    """A person file's header, checked without reading its tensors: what read_person_file checks
    bar the embeddings' values (a truncated copy, a pickle, a foreign or inconsistent file all
    fail here, by the header's own byte ranges against the file's size). DamagedCacheFile."""
    stat = os.fstat(f.fileno())
    try:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(stat.st_size - 8, _MAX_HEADER):
            raise DamagedCacheFile(
                f"cannot be read as a .safetensors file (a header of {length} bytes in a file of {stat.st_size})"
            )
        header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except DamagedCacheFile:
        raise
    except (OSError, ValueError) as error:  # json, utf-8
        raise DamagedCacheFile(f"cannot be read as a .safetensors file ({error})") from None
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != "comfyui-pva-faces":
        raise DamagedCacheFile("not a face-cache file of this pack (no 'comfyui-pva-faces' header)")
    try:
        summary = json.loads(metadata.get("summary", "null"))
    except (TypeError, ValueError) as error:
        raise DamagedCacheFile(f"its header is damaged ({error})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("photos"), list):
        raise DamagedCacheFile("its header has no list of photos")
    count = len(summary["photos"])
    data_start, data_size = 8 + length, stat.st_size - 8 - length
    ranges, end = {}, 0
    for name, (dtype, size, shape) in _TENSORS.items():
        entry = header.get(name)
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise DamagedCacheFile(
                f"cannot be read as a .safetensors file (no tensor {name!r} in its header)"
            )
        if entry.get("shape") != [count, *shape]:
            raise DamagedCacheFile(f"{name} has shape {entry.get('shape')} for {count} photos")
        if entry.get("dtype") != dtype:
            raise DamagedCacheFile(f"{name} is {entry.get('dtype')}, not {dtype}")
        begin, stop = offsets
        if not 0 <= begin <= stop or stop - begin != count * size * math.prod(shape):
            raise DamagedCacheFile(f"cannot be read as a .safetensors file ({name}'s byte range {offsets})")
        ranges[name], end = (begin, stop), max(end, stop)
    if end != data_size:
        raise DamagedCacheFile(
            f"cannot be read as a .safetensors file (its tensors take {end} bytes, the file holds {data_size}"
            f"{': a truncated copy' if end > data_size else ''})"
        )
    return _Header(summary, data_start, ranges, _file_identity(stat))


def _checked_header(path: Path) -> _Header:
    try:
        with open(path, "rb") as f:
            return _read_header(f)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DamagedCacheFile(f"cannot be read ({error.strerror})") from None


def _photo_entries(summary: dict) -> tuple[tuple, tuple, tuple]:
    """(keys, faces, sizes) of the photos in a person file's header; KeyError, TypeError or
    ValueError when an entry is incomplete."""
    photos = summary["photos"]
    faces = tuple(
        DetectedFace(tuple(p["box"]), tuple(tuple(q) for q in p["landmarks"]), p["probability"])
        for p in photos
    )
    return tuple(p["key"] for p in photos), faces, tuple(tuple(p["size"]) for p in photos)


def _damaged_cache_error(path: Path, error: Exception) -> PVAError:
    what = error if isinstance(error, DamagedCacheFile) else f"a photo's entry is incomplete ({error!r})"
    return PVAError(
        f"{path}: {what}; run scripts/preprocess_faces.py again with the same --cache, which "
        "makes damaged files again."
    )


def _changed_error(path: str) -> PVAError:
    return PVAError(
        f"{path}: the face-cache file changed after load_faces read it (was the cache preprocessed "
        "again while this ran?); start this run again."
    )


@functools.lru_cache(maxsize=256)  # a sample reads its person several times; bounded memory
def _person_data(path: str, identity: tuple) -> _PersonData:
    """A person's photos and embeddings, read from their file, which must still be the file
    load_faces checked."""
    try:
        with open(path, "rb") as f:
            if _file_identity(os.fstat(f.fileno())) != identity:
                raise _changed_error(path)
            header = _read_header(f)
            tensors = {}
            for name in ("embeddings", "mirrored"):
                begin, stop = header.ranges[name]
                f.seek(header.data_start + begin)
                data = bytearray(f.read(stop - begin))
                tensors[name] = torch.frombuffer(data, dtype=torch.float32).reshape(-1, 512)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            # the header was fine, so preprocessing would reuse the file: it must go first
            raise PVAError(
                f"{path}: its embeddings are not finite numbers; delete it and run "
                "scripts/preprocess_faces.py again with the same --cache, which makes it again."
            )
        return _PersonData(*_photo_entries(header.summary), tensors["embeddings"], tensors["mirrored"])
    except OSError as error:
        raise PVAError(
            f"{path}: the face-cache file cannot be read any more ({error.strerror}); was the cache "
            "moved or preprocessed again while this ran? Start this run again."
        ) from None
    except (DamagedCacheFile, KeyError, TypeError, ValueError) as error:
        if isinstance(error, PVAError):
            raise
        raise _damaged_cache_error(Path(path), error) from None


def _cached_summary(path: Path, fingerprint: str) -> tuple[dict | None, bool]:
    """(The header of a finished person file made with these settings and photos, or None;
    whether a file was there but damaged, and is to be made again.) Reads the header alone."""
    try:
        summary = _checked_header(path).summary
    except FileNotFoundError:
        return None, False
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
    shard: tuple[int, int] | None = None,
) -> PreprocessReport:
    """Fill the cache for every person of the dataset (all splits: validation and evaluation
    read it too), reusing what an earlier run finished; write report.json.

    shard=(i, n): only the people of shard i of n (see the module's docstring); the report
    returned and written to reports/shard-<i>-of-<n>.json is the shard's, and report.json is
    written for the whole dataset by the shard that finds every shard's report there."""
    cache_dir = Path(cache_dir)
    shard = None if shard is None else check_shard(shard)
    if shard is not None and shard[1] == 1:
        shard = None  # one shard is the whole dataset
    if not Path(settings.facenet).is_file():
        raise PVAError(
            f"facenet: {settings.facenet} not found; give the FaceNet weights file (.pt or .safetensors)."
        )
    make_writable_folder(cache_dir, "cache")
    (cache_dir / PEOPLE_DIR).mkdir(exist_ok=True)
    if shard is not None:
        # this shard is being made again: report.json must wait for it
        shard_report_file(cache_dir, shard).unlink(missing_ok=True)
    fingerprint, weights = settings._digests()
    worker_settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    worker_settings["facenet_digest"] = weights
    report = PreprocessReport()
    jobs = []
    for person in dataset.people.values():
        if shard is not None and shard_of(person.name, shard[1]) != shard[0]:
            continue
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
    if shard is None:
        write_json_atomically(cache_dir / "report.json", asdict(report))
        return report
    mine = {
        "shard": list(shard),
        "settings": fingerprint,
        "people": _people_digest(dataset),
        "report": asdict(report),
        "example_positions": _example_positions(dataset, report.examples),
    }
    write_json_atomically(shard_report_file(cache_dir, shard), mine)
    reports, missing = _matching_shard_reports(cache_dir, mine)
    if not missing:  # the last shard to finish: the whole dataset's report
        write_json_atomically(cache_dir / "report.json", asdict(_merged(reports)))
    return report


def load_faces(cache_dir: str | os.PathLike, people: Iterable[str]) -> dict[str, PersonFaces]:
    """The cached faces of `people` with at least MIN_PHOTOS usable photos. Every file's header
    is read and checked now (a damaged one is named here, not hours into training); the photos'
    records and embeddings are read again when used (see PersonFaces)."""
    cache_dir = Path(cache_dir)
    loaded = {}
    missing = []
    for name in people:
        path = person_file(cache_dir, name)
        try:
            header = _checked_header(path)
            _photo_entries(header.summary)  # checked, not kept
            facenet = str(header.summary.get("facenet", ""))
        except FileNotFoundError:
            missing.append(name)
            continue
        except (DamagedCacheFile, KeyError, TypeError, ValueError) as error:
            raise _damaged_cache_error(path, error) from None
        count = len(header.summary["photos"])
        if count < MIN_PHOTOS:
            continue
        loaded[name] = PersonFaces._from_file(name, path, facenet, count, header.identity)
    if missing:
        raise PVAError(
            f"cache {cache_dir}: {len(missing)} people of the dataset were never preprocessed (e.g. {missing[0]!r}); "
            "run scripts/preprocess_faces.py on this dataset first."
        )
    return loaded
