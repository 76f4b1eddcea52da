"""The test models the suite builds once and caches in $PVA_DEV_HOME/test-models, made
reproducibly: the same bytes on any machine with the same package versions.

Each artefact is a recipe (every number that changes its bytes, a version among them), the
artefacts it is made from, and a build function. Its file name carries a key: a hash of the
recipe, the keys of what it is made from and the platform (package versions, the CPU's
instruction set), so a change to any of them makes a new file instead of reusing a stale one.

A build runs in a process of its own (nothing a test did before can change it: thread count,
global seeds, ComfyUI's loaded models, accelerate's state) with one torch thread, deterministic
algorithms and every random draw from a seeded generator. Its digest (sha256 of the file, or of
a folder's manifest) is then checked against the one recorded for this platform in
artefact_digests.json: a build that drifts is named at once, not discovered through an unrelated
assertion later. A new or changed recipe is recorded with

    python tests/harness/artefacts.py record        # build what is missing, write the digests
    python tests/harness/artefacts.py build NAME... # build (or check) some
    python tests/harness/artefacts.py list          # names, files, digests
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# the recorded digests (PVA_TEST_MODEL_DIGESTS names another file: the harness's own tests)
DIGESTS_FILE = Path(
    os.environ.get("PVA_TEST_MODEL_DIGESTS") or Path(__file__).with_name("artefact_digests.json")
)


def world_seed(seed: int) -> int:
    """`seed` in the test world that PVA_TEST_WORLD_SEED selects (0, the default, is the one the
    digests are recorded for). The seeds of the test models and of the identity claims go through
    here, so that each claim's margin can be measured on other, independently seeded worlds:
    PVA_TEST_WORLD_SEED=1 scripts/test -m claims -s"""
    return seed + 1_000_003 * int(os.environ.get("PVA_TEST_WORLD_SEED", "0"))


def cache_dir() -> Path:
    """Outside the repository: $PVA_DEV_HOME/test-models (~/.cache/comfyui-pva/test-models)."""
    home = Path(os.environ.get("PVA_DEV_HOME", Path.home() / ".cache/comfyui-pva"))
    return home / "test-models"


@dataclass(frozen=True)
class Artefact:
    name: str
    recipe: dict
    build: Callable[[Path], None]  # writes the artefact at the given (temporary) path
    needs: tuple[str, ...] = ()
    suffix: str = ".safetensors"  # "" for a folder
    describe: str = ""
    slow: bool = False  # minutes to build (training, preprocessing), not seconds

    def key(self) -> str:
        parts = {
            "recipe": self.recipe,
            "platform": platform(),
            "needs": {name: ARTEFACTS[name].key() for name in self.needs},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"{self.name}-{self.key()}{self.suffix}"

    def path(self) -> Path:
        return cache_dir() / self.file_name()

    def is_folder(self) -> bool:
        return self.suffix == ""


ARTEFACTS: dict[str, Artefact] = {}


def artefact(
    name: str, recipe: dict, needs: tuple[str, ...] = (), suffix: str = ".safetensors", slow: bool = False
) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register `build(path)` as the builder of `recipe` (its docstring's first line describes it).
    Register them in the order a background build should make them."""

    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        describe = (build.__doc__ or "").strip().split("\n")[0]
        ARTEFACTS[name] = Artefact(name, recipe, build, needs, suffix, describe, slow)
        return build

    return register


# -- the platform ---------------------------------------------------------------------------------
@cache
def platform() -> dict[str, str]:
    """What else changes a build's bytes: package versions and the CPU's vector instructions
    (torch picks its kernels by them, and their sums round differently)."""
    import platform as py_platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "-"

    return {
        "python": py_platform.python_version(),
        "cpu": f"{py_platform.machine()}/{torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "numpy": installed("numpy"),
        "pillow": installed("pillow"),
        "facenet-pytorch": installed("facenet-pytorch"),
        "accelerate": installed("accelerate"),
        "scikit-image": installed("scikit-image"),
        "templates": _portrait_versions(),
        "comfyui": _comfyui_version(),
    }


def _portrait_versions() -> str:
    """Versions of the pinned portrait packages (harness/portraits.py), read from their folder."""
    from importlib.metadata import distributions

    from .host import portrait_packages

    found = {
        d.metadata["Name"].lower().replace("_", "-"): d.version
        for d in distributions(path=[str(portrait_packages())])
    }
    return ",".join(
        found.get(p, "-")
        for p in ("comfyui-workflow-templates-media-image", "comfyui-workflow-templates-media-other")
    )


def _comfyui_version() -> str:
    from .host import comfyui_path

    text = (comfyui_path() / "comfyui_version.py").read_text()
    return text.split("=", 1)[1].strip().strip("\"'") if "=" in text else text.strip()


def platform_id() -> str:
    """A short name for the platform the recorded digests hold."""
    p = platform()
    digest = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
    return f"torch-{p['torch']}-{p['cpu']}-{digest}"


# -- digests ----------------------------------------------------------------------------------
def digest(path: Path) -> str:
    """sha256 of a file; of a folder, of its manifest (every file's relative path and sha256)."""
    if path.is_file():
        return _file_digest(path)
    lines = [
        f"{file.relative_to(path).as_posix()} {_file_digest(file)}"
        for file in sorted(p for p in path.rglob("*") if p.is_file())
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def recorded_digests() -> dict[str, str]:
    """file name -> sha256 recorded for this platform ({} when none are)."""
    if not DIGESTS_FILE.is_file():
        return {}
    return json.loads(DIGESTS_FILE.read_text()).get(platform_id(), {}).get("artefacts", {})


class DriftError(RuntimeError):
    pass


DRIFT_EXIT = 3  # a builder process's exit status for DriftError


def check_digest(item: Artefact, found: str) -> str:
    """`found`; DriftError when it differs from the digest recorded for this platform."""
    expected = recorded_digests().get(item.file_name())
    if expected is not None and found != expected:
        raise DriftError(
            f"test model {item.file_name()} ({item.describe}) has sha256 {found[:16]}..., but {expected[:16]}... is "
            f"recorded for this platform ({platform_id()}): its build is not reproducible, or its recipe "
            "changed without a new version. Find what made the bytes differ; re-record only for an "
            "intended change (python tests/harness/artefacts.py record)."
        )
    return found


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stored_digest(path: Path) -> str | None:
    marker = _digest_file(path)
    return marker.read_text().strip() if marker.is_file() else None


# -- building ---------------------------------------------------------------------------------
@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Held while an artefact is built, so concurrent test sessions build it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_built(name: str) -> bool:
    path = ARTEFACTS[name].path()
    return path.exists() and _digest_file(path).is_file()


def ensure(name: str) -> Path:
    """The artefact's path, built first (in a process of its own) if it is not in the cache."""
    if name not in ARTEFACTS:
        register_all()
    item = ARTEFACTS[name]
    path = item.path()
    if is_built(name):
        return path
    for needed in item.needs:
        ensure(needed)
    with _lock(path):
        if not is_built(name):
            _run_builder(name)
    return path


def builder_command(name: str, *options: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a builder process."""
    from .host import comfyui_path

    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONHASHSEED"] = "0"
    return [sys.executable, str(Path(__file__)), "_build", name, *options], env


def _run_builder(name: str) -> None:
    command, env = builder_command(name)
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode == DRIFT_EXIT:
        raise DriftError(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        raise RuntimeError(
            f"building test model {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    print(
        f"[test models] built {ARTEFACTS[name].file_name()} in {time.monotonic() - started:.0f} s", flush=True
    )


def pin_determinism() -> None:
    """One thread and deterministic kernels: the same bytes whatever the machine's core count."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def build_here(name: str, out: Path | None = None, changes: dict | None = None, pinned: bool = True) -> Path:
    """Build one artefact in this process (its needs must exist): into the cache, checked against
    its recorded digest; or, for tests of the builder, into `out` with some of the recipe's values
    changed (`changes`) and, with pinned=False, on the machine's default threads and algorithms."""
    from .host import import_comfy_on_cpu

    import_comfy_on_cpu()
    if pinned:
        pin_determinism()
    item = ARTEFACTS[name]
    if changes:
        assert out is not None, "a changed recipe never goes into the cache"
        item.recipe.update(changes)  # the builders read their recipe
    final = out or item.path()
    # a fixed temporary name: some writers (torch.save) put the file's name inside it
    temporary = final.with_name(f".{final.name}.building")
    _remove(temporary)
    try:
        item.build(temporary)
        if out is not None:
            os.replace(temporary, final)
            return final
        found = check_digest(item, digest(temporary))  # a drift is named here, not in some test later
        _remove(final)
        os.replace(temporary, final)
        _digest_file(final).write_text(found + "\n")
    finally:
        _remove(temporary)
    return final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- the command line ---------------------------------------------------------------------------
def register_all() -> None:
    from .host import import_comfy_on_cpu

    import_comfy_on_cpu()  # the builders' modules import ComfyUI
    from . import checkpoints, pretrained, pretraining  # noqa: F401  (their artefacts register)


def main(argv: list[str] | None = None) -> int:
    from .host import import_comfy_on_cpu

    import_comfy_on_cpu()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    build = sub.add_parser("build")
    build.add_argument("names", nargs="*", help="default: all")
    sub.add_parser("record")
    private = sub.add_parser("_build")
    private.add_argument("name")
    private.add_argument("--out")
    private.add_argument("--change", action="append", default=[], metavar="KEY=JSON")
    private.add_argument("--unpinned", action="store_true")
    args = parser.parse_args(argv)
    register_all()
    if args.command == "_build":
        try:
            changes = {k: json.loads(v) for k, v in (c.split("=", 1) for c in args.change)}
            build_here(args.name, Path(args.out) if args.out else None, changes, pinned=not args.unpinned)
        except DriftError as error:
            print(error, file=sys.stderr)
            return DRIFT_EXIT
        return 0
    if args.command == "list":
        recorded = recorded_digests()
        for item in ARTEFACTS.values():
            path = item.path()
            state = _stored_digest(path) if is_built(item.name) else "not built"
            mark = "" if recorded.get(path.name) in (None, state) else "  DIFFERS FROM THE RECORD"
            print(f"{item.name:<28} {path.name}\n    {item.describe}\n    {state}{mark}")
        return 0
    names = args.names if args.command == "build" and args.names else list(ARTEFACTS)
    for name in names:
        ensure(name)
    if args.command == "record":
        record = json.loads(DIGESTS_FILE.read_text()) if DIGESTS_FILE.is_file() else {}
        entry = record.setdefault(platform_id(), {"platform": platform(), "artefacts": {}})
        entry["platform"] = platform()
        entry["artefacts"] = {
            ARTEFACTS[n].file_name(): _stored_digest(ARTEFACTS[n].path()) for n in ARTEFACTS
        }
        DIGESTS_FILE.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(f"recorded {len(entry['artefacts'])} digests for {platform_id()} in {DIGESTS_FILE}")
    return 0


if __name__ == "__main__":  # run as a file: hand over to the package module (one registry)
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    from harness.artefacts import main as package_main

    sys.exit(package_main())
