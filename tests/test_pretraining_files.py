"""Pretraining's files under damage: a damaged face-cache entry, text cache or checkpoint file is
named with what to do (or made again where it can be), and replacing a checkpoint is crash-safe:
killed at any step of the replacement, the step's name holds a complete checkpoint, old or new,
and the next run tidies what was left."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness.host import REPO_ROOT, comfyui_path

from pva.errors import PVAError
from pva.pretraining.checkpoints import REQUIRED, find_checkpoint, recover, save_checkpoint


class Payload:
    """What an attacker's pickle would run on loading: it must never run."""

    def __reduce__(self):
        return (Path(os.environ.get("PVA_PAYLOAD_FLAG", "/nonexistent/flag")).touch, ())


def _pickle_at(path: Path, flag: Path) -> None:
    os.environ["PVA_PAYLOAD_FLAG"] = str(flag)
    path.write_bytes(pickle.dumps({"tensor": Payload()}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- the face cache ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    from harness.pretraining import synthetic_world

    return synthetic_world()


@pytest.fixture
def small_cache(world, tmp_path):
    """The world's dataset reduced to 3 people, with a copy of their face cache."""
    from pva.data.datasets import open_dataset
    from pva.data.preprocess import person_file

    names = sorted(world.dataset().people)[:3]
    data, cache = tmp_path / "people", tmp_path / "faces"
    for name in names:
        shutil.copytree(world.data / name, data / name, copy_function=shutil.copy2)
        person_file(cache, name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(person_file(world.cache, name), person_file(cache, name))
    return open_dataset(data), cache


@pytest.mark.test_models("synthetic-people")
def test_damaged_face_cache_entries_are_named_and_preprocessing_makes_them_again(
    world, small_cache, tmp_path
):
    from pva.data.preprocess import PreprocessSettings, load_faces, person_file, preprocess_dataset

    dataset, cache = small_cache
    first, second, third = sorted(dataset.people)
    flag = tmp_path / "payload-ran"
    _pickle_at(person_file(cache, first), flag)
    with pytest.raises(PVAError) as caught:
        load_faces(cache, dataset.people)
    message = str(caught.value)
    assert message.startswith(f"{person_file(cache, first)}: cannot be read as a .safetensors file")
    assert "run scripts/preprocess_faces.py again with the same --cache" in message
    _truncate(person_file(cache, second))
    shutil.copy2(person_file(world.cache, first), person_file(cache, first))
    with pytest.raises(PVAError, match=rf"^{person_file(cache, second)}: cannot be read"):
        load_faces(cache, dataset.people)
    # a readable file whose tensors disagree with its own header
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(person_file(cache, third)))
    from safetensors import safe_open

    with safe_open(str(person_file(cache, third)), framework="pt") as f:
        metadata = f.metadata()
    save_file({**tensors, "embeddings": tensors["embeddings"][:1]}, str(person_file(cache, third)), metadata)
    # preprocessing counts the damaged files and makes them again, the good one is reused
    settings = PreprocessSettings(facenet=world.facenet, min_face_size=20, threads=1)
    report = preprocess_dataset(dataset, cache, settings)
    assert (report.people_damaged, report.people_reused) == (2, 1), report
    assert "2 damaged cache files made again" in report.text()
    faces = load_faces(cache, dataset.people)
    original = load_faces(world.cache, dataset.people)
    for name in dataset.people:
        assert torch.equal(faces[name].embeddings, original[name].embeddings), name
    assert not flag.exists(), "the pickle's payload ran"


@pytest.mark.test_models("synthetic-people")
def test_the_pretraining_script_names_a_damaged_cache_file_without_a_traceback(world, small_cache, tmp_path):
    from pva.data.preprocess import person_file

    dataset, cache = small_cache
    damaged = person_file(cache, sorted(dataset.people)[0])
    _pickle_at(damaged, tmp_path / "payload-ran")
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--checkpoint", str(tmp_path / "any.safetensors"),
        "--data", str(dataset.root), "--cache", str(cache), "--output", str(tmp_path / "run"), "--cpu",
    ]  # fmt: skip
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"error: {damaged}: cannot be read as a .safetensors file" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "payload-ran").exists()


# -- the text cache -----------------------------------------------------------------------------
def _encode(caption: str):
    return torch.full((1, 77, 8), float(len(caption))), None


@pytest.mark.parametrize("damage", ["pickle", "truncated", "foreign tensors"])
def test_a_damaged_text_cache_is_made_again(tmp_path, damage, capsys):
    from safetensors.torch import save_file

    from pva.data.text_cache import TextCache

    path = tmp_path / "text.safetensors"
    TextCache.build(path, ["a photo", "another photo"], _encode)
    if damage == "pickle":
        _pickle_at(path, tmp_path / "payload-ran")
    elif damage == "truncated":
        _truncate(path)
    else:
        save_file({"weights": torch.zeros(3)}, str(path))
    if damage != "foreign tensors":  # (those open; the build below finds them out)
        with pytest.raises(PVAError, match=rf"^{path}: the text cache cannot be read .*delete it"):
            TextCache(path)
    cache = TextCache.build(path, ["a photo", "another photo"], _encode)
    assert f"text cache {path}:" in capsys.readouterr().out
    conds, pooled = cache.lookup(["another photo", "a photo"])
    assert conds[:, 0, 0].tolist() == [13.0, 7.0] and pooled is None
    assert not (tmp_path / "payload-ran").exists()


# -- checkpoints: damaged files ---------------------------------------------------------------------
def _files(content: str) -> dict:
    def write(path: Path) -> None:
        if path.name == "state.pt":
            torch.save({"format": 1, "step": 1, "content": content}, path)
        else:
            path.write_text(content)

    return {"pva.safetensors": write, "state.pt": write}


def test_damaged_checkpoint_files_are_named(tmp_path):
    from pva.pretraining.checkpoints import read_state

    save_checkpoint(tmp_path, 1, _files("one"), {"step": 1})
    save_checkpoint(tmp_path, 2, _files("two"), {"step": 2})
    folder = tmp_path / "checkpoints"
    # state.pt replaced by a pickle that would run code: refused, named, never run
    _pickle_at(folder / "step-0000002" / "state.pt", tmp_path / "payload-ran")
    with pytest.raises(
        PVAError,
        match=rf"^{folder / 'step-0000002' / 'state.pt'}: cannot be read, it holds Python objects .*--resume <folder>",
    ):
        read_state(find_checkpoint(tmp_path, "latest"))
    assert not (tmp_path / "payload-ran").exists()
    # meta.json damaged
    (folder / "step-0000002" / "meta.json").write_text("{not json")
    with pytest.raises(PVAError, match=rf"^{folder / 'step-0000002' / 'meta.json'}: damaged"):
        find_checkpoint(tmp_path, "latest")
    # latest.json damaged: the newest complete checkpoint, and latest.json made again
    shutil.rmtree(folder / "step-0000002")
    (folder / "latest.json").write_text("\0\0garbage")
    assert find_checkpoint(tmp_path, "latest").name == "step-0000001"
    assert json.loads((folder / "latest.json").read_text()) == {"checkpoint": "step-0000001", "step": 1}
    # latest.json pointing at a folder that is gone, and nothing complete left
    (folder / "step-0000001" / "state.pt").unlink()
    with pytest.raises(
        PVAError, match=r"latest.json: it names step-0000001, which is not a complete.*start a new run"
    ):
        find_checkpoint(tmp_path, "latest")


@pytest.mark.test_models("synthetic-people")
def test_resuming_from_a_checkpoint_with_damaged_weights_names_the_file(world, tmp_path):
    from harness.pretraining import pretraining_run

    run = pretraining_run(world, tmp_path / "run", checkpoint_every=1)
    run()
    weights = tmp_path / "run" / "checkpoints" / "step-0000001" / "pva.safetensors"
    _truncate(weights)
    with pytest.raises(PVAError, match=rf"^{weights}: .*Resume from another checkpoint"):
        run(resume="latest")


# -- checkpoints: a replacement killed at each of its steps -----------------------------------------
_KILLER = """
import os, sys
sys.path[:0] = [{repo!r}]
import torch
from pathlib import Path
import pva.pretraining.checkpoints as checkpoints

def crash_point(name):
    if name == {point!r}:
        os._exit(9)

checkpoints.crash_point = crash_point
if {no_exchange!r}:
    checkpoints.exchange = lambda a, b: False

def write(path):
    if path.name == "state.pt":
        torch.save({{"format": 1, "step": 2, "content": "new"}}, path)
    else:
        path.write_text("new")

checkpoints.save_checkpoint(Path({out!r}), 2, {{"pva.safetensors": write, "state.pt": write}}, {{"step": 2, "content": "new"}})
"""

EXCHANGE_POINTS = ["written", "exchanged", "old removed", "latest written"]
ASIDE_POINTS = ["written", "old set aside", "renamed in", "old removed", "latest written"]


@pytest.mark.training  # a process killed per case
@pytest.mark.parametrize(
    "no_exchange, point",
    [(False, p) for p in EXCHANGE_POINTS] + [(True, p) for p in ASIDE_POINTS],
    ids=[f"exchange-{p}" for p in EXCHANGE_POINTS] + [f"aside-{p}" for p in ASIDE_POINTS],
)
def test_a_checkpoint_replacement_killed_at_any_step_leaves_a_complete_checkpoint(
    tmp_path, no_exchange, point
):
    save_checkpoint(tmp_path, 2, _files("old"), {"step": 2, "content": "old"})
    save_checkpoint(tmp_path, 3, _files("three"), {"step": 3, "content": "three"})
    code = _KILLER.format(repo=str(REPO_ROOT), point=point, no_exchange=no_exchange, out=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-3000:]  # killed where it was told to be
    folder = tmp_path / "checkpoints" / "step-0000002"

    def content() -> str:
        assert all((folder / name).is_file() for name in REQUIRED), sorted(p.name for p in folder.iterdir())
        meta = json.loads((folder / "meta.json").read_text())["content"]
        assert (folder / "pva.safetensors").read_text() == meta  # one checkpoint, not a mixture
        return meta

    if point == "old set aside":  # the one instant without exchange where the name is empty
        assert not folder.exists()
    else:
        assert content() == ("old" if point == "written" else "new")
    # the next run's start tidies up: the name holds a complete checkpoint, nothing else is left
    recover(tmp_path)
    assert content() == ("old" if point in ("written", "old set aside") else "new")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step-0000002", "step-0000003",
    ]  # fmt: skip
    resumed = find_checkpoint(tmp_path, "latest")
    assert resumed.name == ("step-0000002" if point == "latest written" else "step-0000003")


def test_the_exchange_is_used_where_the_system_has_it(tmp_path):
    """On Linux the replacement swaps the two folders in one step (renameat2)."""
    from pva.pretraining.checkpoints import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if not exchange(a, b):
        pytest.skip("this system or file system cannot exchange two names atomically")
    assert ((a / "which").read_text(), (b / "which").read_text()) == ("b", "a")
