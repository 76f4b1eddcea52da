"""Dataset preprocessing: every face detected and embedded once, cached, resumable; bad photos
and people with too few photos skipped and counted, never a crash."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.portraits import portrait
from harness.synthetic_people import person_photos
from PIL import Image
from safetensors import safe_open

from pva.data.datasets import open_dataset
from pva.data.preprocess import PreprocessSettings, load_faces, person_file, preprocess_dataset
from pva.errors import PVAError

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def facenet_file(tmp_path_factory) -> Path:
    from harness.pretraining import calibrated_facenet

    return calibrated_facenet(
        tmp_path_factory.mktemp("facenet") / "facenet.safetensors", calibration_people=3
    )


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def messy_dataset(tmp_path) -> Path:
    """3 people with 3 good photos (one also has a photo with two faces, one a faceless photo,
    one a corrupt file), and a person with a single usable photo."""
    root = tmp_path / "people"
    for index in range(3):
        for k, pixels in enumerate(person_photos(index, 3)):
            _save(pixels, root / f"p{index}" / f"{k}.png")
    two = np.asarray(Image.fromarray(portrait("desk_two_faces")).resize((384, 384)))
    _save(two, root / "p0" / "two-faces.png")
    _save(np.full((96, 96, 3), 128, np.uint8), root / "p1" / "wall.png")
    (root / "p2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _save(person_photos(3, 1)[0], root / "lonely" / "0.png")
    _save(np.full((96, 96, 3), 90, np.uint8), root / "lonely" / "1.png")
    return root


def test_counts_skips_and_caches_every_face(messy_dataset, facenet_file, tmp_path):
    dataset = open_dataset(messy_dataset)
    cache = tmp_path / "cache"
    report = preprocess_dataset(dataset, cache, PreprocessSettings(facenet=facenet_file, min_face_size=20))
    assert (report.people, report.people_usable, report.people_too_few_photos) == (4, 3, 1)
    assert (report.photos, report.photos_usable) == (14, 11)
    assert (report.photos_without_face, report.photos_unreadable, report.photos_with_several_faces) == (
        2,
        1,
        1,
    )
    assert report.examples["unreadable"] == ["p2/broken.jpg"]
    assert sorted(report.examples["no_face"]) == ["lonely/1.png", "p1/wall.png"]
    assert json.loads((cache / "report.json").read_text())["photos_usable"] == 11

    faces = load_faces(cache, dataset.people)
    assert sorted(faces) == ["p0", "p1", "p2"]  # "lonely" has one usable photo: left out
    p0 = faces["p0"]
    assert p0.keys == ("p0/0.png", "p0/1.png", "p0/2.png", "p0/two-faces.png")
    assert p0.embeddings.shape == (4, 512) and p0.mirrored.shape == (4, 512)
    torch.testing.assert_close(p0.embeddings.norm(dim=1), torch.ones(4))
    assert p0.sizes[3] == (384, 384)
    # the photo with two faces: the largest face was used (the woman, not the framed portrait)
    assert p0.faces[3].size > 50
    # the cached crops are what FaceNet saw: embedding them again gives the cached embeddings
    from pva.faces.facenet import embed_faces, load_facenet_model

    again = embed_faces(load_facenet_model(facenet_file), p0.crops(range(4)))
    assert torch.nn.functional.cosine_similarity(again, p0.embeddings).min() > 0.999
    # a mirror image is another view: close to, but not the same as, the photo itself
    similarity = torch.nn.functional.cosine_similarity(p0.embeddings, p0.mirrored)
    assert (similarity < 0.9999).all() and (similarity > 0.3).all()


def test_resumes_after_a_crash_and_redoes_only_what_changed(messy_dataset, facenet_file, tmp_path):
    dataset = open_dataset(messy_dataset)
    cache = tmp_path / "cache"
    settings = PreprocessSettings(facenet=facenet_file, min_face_size=20)
    preprocess_dataset(dataset, cache, settings)
    before = {name: person_file(cache, name).stat().st_mtime_ns for name in dataset.people}
    # a crash left p1's file half-written, p2's never written; p0 got a new photo
    data = person_file(cache, "p1").read_bytes()
    person_file(cache, "p1").write_bytes(data[: len(data) // 3])
    person_file(cache, "p2").unlink()
    _save(person_photos(0, 4)[3], messy_dataset / "p0" / "new.png")
    report = preprocess_dataset(open_dataset(messy_dataset), cache, settings)
    assert report.people_reused == 1  # only "lonely" was still valid
    after = {name: person_file(cache, name).stat().st_mtime_ns for name in dataset.people}
    assert after["lonely"] == before["lonely"] and after["p0"] != before["p0"]
    assert len(load_faces(cache, open_dataset(messy_dataset).people)["p0"]) == 5
    # nothing left behind by the atomic writes
    assert not [p for p in (cache / "people").iterdir() if p.name.startswith(".")]
    # other settings (another threshold) make the whole cache anew
    report = preprocess_dataset(
        open_dataset(messy_dataset),
        cache,
        PreprocessSettings(facenet=facenet_file, min_face_size=20, threshold=0.95),
    )
    assert report.people_reused == 0


def test_parallel_workers_give_the_same_cache(messy_dataset, facenet_file, tmp_path):
    dataset = open_dataset(messy_dataset)
    one, two = tmp_path / "one", tmp_path / "two"
    preprocess_dataset(dataset, one, PreprocessSettings(facenet=facenet_file, min_face_size=20))
    preprocess_dataset(dataset, two, PreprocessSettings(facenet=facenet_file, min_face_size=20, workers=2))
    for name in dataset.people:
        with (
            safe_open(str(person_file(one, name)), "pt") as a,
            safe_open(str(person_file(two, name)), "pt") as b,
        ):
            # The same results up to float rounding: MTCNN's convolutions add in another order
            # with another number of threads per process (measured: boxes within 2e-5 px).
            first, second = a.metadata(), b.metadata()
            assert first.keys() == second.keys()
            for key in first:
                _assert_nearly_equal(_parsed(first[key]), _parsed(second[key]), key)
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                # 8-bit crops: one level where a pixel sat on a rounding edge
                atol = 1e-4 if x.is_floating_point() else 1
                torch.testing.assert_close(x, y, rtol=0, atol=atol)


def _parsed(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # a plain string (e.g. the format name)
        return value


def _assert_nearly_equal(a: object, b: object, where: str) -> None:
    """JSON values equal, floats within 1e-3."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) < 1e-3, (where, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_nearly_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_nearly_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_bad_inputs_are_explained(messy_dataset, facenet_file, tmp_path):
    dataset = open_dataset(messy_dataset)
    with pytest.raises(PVAError, match="facenet: .* not found"):
        preprocess_dataset(dataset, tmp_path / "c", PreprocessSettings(facenet=tmp_path / "missing.pt"))
    # a cache path through a file cannot be created, whoever runs this (root ignores chmod)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PVAError, match="cache: cannot write to .*a-file/cache"):
        preprocess_dataset(dataset, blocker / "cache", PreprocessSettings(facenet=facenet_file))
    with pytest.raises(PVAError, match="were never preprocessed .*preprocess_faces.py"):
        load_faces(tmp_path / "empty-cache", dataset.people)


# -- a killed run, shards -------------------------------------------------------------------------
# Runs scripts/preprocess_faces.py in a process of its own whose writer of the person files
# stops half-way through person number `stop_at`'s file and waits there to be killed: what a
# SIGKILL (an OOM kill, a pre-empted machine) leaves in the middle of a write.
KILLED_DRIVER = """
import runpy, sys, time
from pathlib import Path
import pva.data.preprocess as preprocess

script, marker, stop_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
real, calls = preprocess.save_safetensors, []

def save_then_stall(tensors, path, metadata):
    calls.append(path)
    real(tensors, path, metadata)
    if len(calls) == stop_at:
        written = Path(path).read_bytes()
        Path(path).write_bytes(written[: len(written) // 2])
        Path(f"{marker}.part").write_text(str(path))
        Path(f"{marker}.part").rename(marker)  # whole, whenever the kill comes
        time.sleep(600)

preprocess.save_safetensors = save_then_stall
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def _entries(cache: Path) -> dict[str, bytes]:
    """The person files a reader takes as entries (hidden temporary files are not entries)."""
    return {
        p.name: p.read_bytes()
        for p in (cache / "people").iterdir()
        if p.suffix == ".safetensors" and not p.name.startswith(".")
    }


def _report(cache: Path, **replaced) -> dict:
    """report.json, with some counts replaced (e.g. people_reused, which differs in a resumed run)."""
    return {**json.loads((cache / "report.json").read_text()), **replaced}


@pytest.fixture
def four_people(tmp_path) -> Path:
    from harness.synthetic_people import write_people

    return write_people(tmp_path / "four", people=4, photos=3)


def test_a_killed_run_leaves_no_half_entry_and_the_next_run_completes_the_cache(
    four_people, facenet_file, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    from harness.host import REPO_ROOT

    from pva.data.preprocess import DamagedCacheFile, read_person_file

    settings = PreprocessSettings(facenet=facenet_file, min_face_size=20, threads=1)
    dataset = open_dataset(four_people)
    uninterrupted = tmp_path / "uninterrupted"
    preprocess_dataset(dataset, uninterrupted, settings)

    cache, marker = tmp_path / "cache", tmp_path / "stalled-in"
    command = [
        sys.executable, "-c", KILLED_DRIVER, str(REPO_ROOT / "scripts" / "preprocess_faces.py"), str(marker), "3",
        "--data", str(four_people), "--facenet", str(facenet_file), "--cache", str(cache),
        "--min-face-size", "20", "--threads", "1",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300  # not a timing assertion: a hung run must not hang the suite
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            process.kill()
            pytest.fail(f"the run never reached its third person:\n{process.communicate()[0][-3000:]}")
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    # every entry reads back complete: two people finished, the third died half-way through
    entries = _entries(cache)
    for name in entries:
        try:
            summary, embeddings, _ = read_person_file(cache / "people" / name)
        except DamagedCacheFile as error:
            pytest.fail(f"people/{name} is a half-written entry: {error}")
        assert summary["person"] == name.removesuffix(".safetensors")
        assert embeddings.shape == (len(summary["photos"]), 512)
    assert len(entries) == 2, sorted(entries)
    # the half-written file is a hidden temporary file, and the only file that is not an entry
    half = Path(marker.read_text())
    assert half.exists() and half.parent == cache / "people"
    assert half.name.startswith(".") and half.name.endswith(".tmp"), half.name
    visible = sorted(p.name for p in (cache / "people").iterdir() if not p.name.startswith("."))
    assert visible == sorted(entries)
    assert [p.name for p in (cache / "people").iterdir() if p.name.startswith(".")] == [half.name]
    finished = [n.removesuffix(".safetensors") for n in entries]
    assert sorted(load_faces(cache, finished)) == sorted(finished)
    with pytest.raises(PVAError, match="2 people of the dataset were never preprocessed"):
        load_faces(cache, dataset.people)
    assert not (cache / "report.json").exists()  # the run did not finish

    # the next run reuses the finished people and makes the same cache as the uninterrupted run
    report = preprocess_dataset(open_dataset(four_people), cache, settings)
    assert (report.people, report.people_reused, report.people_damaged) == (4, 2, 0)
    assert _entries(cache) == _entries(uninterrupted)
    assert _report(cache, people_reused=0) == _report(uninterrupted)
    assert sorted(load_faces(cache, dataset.people)) == sorted(dataset.people)


def test_two_shards_fill_the_cache_an_unsharded_run_fills(
    messy_dataset, facenet_file, tmp_path, monkeypatch, capsys
):
    import importlib.util

    from harness.host import REPO_ROOT

    from pva.data.preprocess import shard_of, shard_report_file, shards_waited_for

    # skipped photos in both shards, so that the report's examples come from both
    _save(np.full((96, 96, 3), 60, np.uint8), messy_dataset / "p2" / "blank.png")
    dataset = open_dataset(messy_dataset)
    settings = PreprocessSettings(facenet=facenet_file, min_face_size=20, threads=1)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    preprocess_dataset(dataset, whole, settings)
    shares = {i: sorted(n for n in dataset.people if shard_of(n, 2) == i) for i in (0, 1)}
    assert shares == {0: ["p0", "p2"], 1: ["lonely", "p1"]}  # both shards have work, and skipped photos

    first = preprocess_dataset(dataset, sharded, settings, shard=(0, 2))
    assert (first.people, first.photos_unreadable, first.photos_without_face) == (2, 1, 1)
    assert sorted(_entries(sharded)) == [f"{n}.safetensors" for n in shares[0]]
    assert not (sharded / "report.json").exists()  # not before every shard is done
    assert shards_waited_for(sharded, (0, 2)) == [1]

    # the second shard through the script, as torchrun / accelerate launch would start it
    spec = importlib.util.spec_from_file_location(
        "preprocess_faces", REPO_ROOT / "scripts" / "preprocess_faces.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--data", str(messy_dataset), "--facenet", str(facenet_file), "--cache", str(sharded)]
    assert script.main([*argv, "--min-face-size", "20", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/2: 2 of the 4 people" in out and "every shard is done" in out
    assert json.loads(shard_report_file(sharded, (1, 2)).read_text())["report"]["people"] == 2

    # the same person files, byte for byte, and the same report.json (counts and examples)
    assert _report(whole)["examples"]["no_face"] == ["lonely/1.png", "p1/wall.png", "p2/blank.png"]
    assert _entries(sharded) == _entries(whole)
    assert _report(sharded) == _report(whole)
    assert shards_waited_for(sharded, (0, 2)) == []
    faces, expected = load_faces(sharded, dataset.people), load_faces(whole, dataset.people)
    assert sorted(faces) == sorted(expected) == ["p0", "p1", "p2"]
    for name, person in faces.items():
        assert person.keys == expected[name].keys and person.faces == expected[name].faces
        assert torch.equal(person.embeddings, expected[name].embeddings)

    # a shard run again with other settings makes report.json wait for the other shard again
    other = PreprocessSettings(facenet=facenet_file, min_face_size=20, threads=1, threshold=0.95)
    (sharded / "report.json").unlink()
    preprocess_dataset(dataset, sharded, other, shard=(1, 2))
    assert not (sharded / "report.json").exists()
    assert shards_waited_for(sharded, (1, 2)) == [0]
