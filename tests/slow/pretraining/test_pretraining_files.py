"""Pretraining's files under damage in a run: a damaged face-cache entry or checkpoint is named
with what to do (or made again where it can be), and replacing a checkpoint is crash-safe:
killed at any step of the replacement, the step's name holds a complete checkpoint, old or new,
and the next run tidies what was left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from harness.damage import checkpoint_files, pickle_at, truncate
from harness.host import REPO_ROOT, comfyui_path

from pva.errors import PVAError
from pva.pretraining.checkpoints import REQUIRED, find_checkpoint, recover, save_checkpoint


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
    pickle_at(person_file(cache, first), flag)
    with pytest.raises(PVAError) as caught:
        load_faces(cache, dataset.people)
    message = str(caught.value)
    assert message.startswith(f"{person_file(cache, first)}: cannot be read as a .safetensors file")
    assert "run scripts/preprocess_faces.py again with the same --cache" in message
    truncate(person_file(cache, second))
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
    # a training person's file (pretraining reads the train and val people's only)
    damaged = person_file(cache, sorted(dataset.splits["train"])[0])
    pickle_at(damaged, tmp_path / "payload-ran")
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


# -- checkpoints: damaged files ---------------------------------------------------------------------


@pytest.mark.test_models("synthetic-people")
def test_resuming_from_a_checkpoint_with_damaged_weights_names_the_file(world, tmp_path):
    from harness.pretraining import pretraining_run

    run = pretraining_run(world, tmp_path / "run", checkpoint_every=1)
    run()
    weights = tmp_path / "run" / "checkpoints" / "step-0000001" / "pva.safetensors"
    truncate(weights)
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
    save_checkpoint(tmp_path, 2, checkpoint_files("old"), {"step": 2, "content": "old"})
    save_checkpoint(tmp_path, 3, checkpoint_files("three"), {"step": 3, "content": "three"})
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
