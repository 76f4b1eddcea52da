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
