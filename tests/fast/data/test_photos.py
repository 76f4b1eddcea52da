"""One reader for a dataset's pictures: a phone photo stored sideways with an EXIF orientation
is upright in preprocessing, in pretraining samples and in evaluation alike, and a mask follows
one rule (its photo's shape, at the same or another size)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from harness.checkpoints import facenet_random_weights
from harness.portraits import small_portrait
from PIL import Image

from pva.data.datasets import open_dataset
from pva.data.photos import read_mask, read_photo
from pva.data.preprocess import PreprocessSettings, load_faces, preprocess_dataset
from pva.errors import PVAError
from pva.evaluation.generate import references_from_cache
from pva.evaluation.plan import IdentityPlan, load_target, locator_for
from pva.evaluation.settings import EvaluationSettings
from pva.pretraining.samples import PretrainingSamples, SampleSettings

ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE_TO_VIEW = 6


@pytest.fixture
def phone_photos(tmp_path):
    """A person with the same portrait twice: stored upright, and stored sideways with the EXIF
    orientation a phone writes; a third photo of them."""
    upright = small_portrait("astronaut", 256)
    folder = tmp_path / "people" / "anna"
    folder.mkdir(parents=True)
    Image.fromarray(upright).save(folder / "a-upright.png")
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATE_90_CLOCKWISE_TO_VIEW
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(folder / "b-sideways.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(upright[:, ::-1])).save(folder / "c-mirrored.png")
    return tmp_path, upright


@pytest.mark.test_models("facenet-random")
def test_a_sideways_phone_photo_is_upright_in_preprocessing_samples_and_evaluation(phone_photos):
    root, upright = phone_photos
    sideways = root / "people" / "anna" / "b-sideways.png"
    with Image.open(sideways) as image:  # control: without its EXIF the photo lies on its side
        assert np.asarray(image).shape == (256, 256, 3) and not np.array_equal(np.asarray(image), upright)
    expected = torch.from_numpy(upright.astype(np.float32) / 255.0)
    assert torch.equal(read_photo(sideways), expected)

    dataset = open_dataset(root / "people")
    photos = {p.key: p for p in dataset.people["anna"].photos}
    upright_photo, sideways_photo = photos["anna/a-upright.png"], photos["anna/b-sideways.png"]
    # preprocessing: the same face, the same embedding
    settings = PreprocessSettings(facenet=facenet_random_weights(), min_face_size=20, threads=1)
    preprocess_dataset(dataset, root / "faces", settings)
    cached = load_faces(root / "faces", ["anna"])["anna"]
    first, second = cached.keys.index(upright_photo.key), cached.keys.index(sideways_photo.key)
    assert cached.faces[first] == cached.faces[second] and cached.sizes[first] == cached.sizes[second]
    assert torch.equal(cached.embeddings[first], cached.embeddings[second])
    # pretraining samples: the same crop and mask
    samples = PretrainingSamples(dataset, {"anna": cached}, ["anna"], SampleSettings(resolution=64), seed=0)
    crops = [samples.target(cached, i, random.Random(7)) for i in (first, second)]
    assert torch.equal(crops[0][0], crops[1][0]) and torch.equal(crops[0][1], crops[1][1])
    # evaluation: the same target and, from the face cache, the same references
    evaluation = EvaluationSettings(mask_types=("wholeface",), resolution=256)
    targets = [
        load_target("anna", p, evaluation, locator_for(evaluation)) for p in (upright_photo, sideways_photo)
    ]
    assert torch.equal(targets[0].pixels, targets[1].pixels)
    plan = IdentityPlan("anna", (upright_photo, sideways_photo), ())
    references = references_from_cache(cached, plan, [p.read() for p in plan.references])
    assert torch.equal(references.embeddings[0], references.embeddings[1])
    assert references.faces.photos[0] == references.faces.photos[1]


def test_a_mask_has_its_photos_shape_at_any_size(tmp_path):
    half = np.zeros((32, 48), np.uint8)
    half[:, 24:] = 255
    Image.fromarray(half).save(tmp_path / "small.png")
    Image.fromarray(half.T.copy()).save(tmp_path / "turned.png")
    mask = read_mask(tmp_path / "small.png", (64, 96), tmp_path / "photo.png")  # an export at half size
    assert mask.shape == (64, 96) and mask[:, :48].sum() == 0 and mask[:, 48:].all()
    with pytest.raises(PVAError, match=r"mask .*turned.png is 32x48 but its photo .*photo.png is 96x64"):
        read_mask(tmp_path / "turned.png", (64, 96), tmp_path / "photo.png")
    with pytest.raises(PVAError, match=r"does not exist"):
        read_photo(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(PVAError, match=r"broken.png cannot be read as an image"):
        read_photo(tmp_path / "broken.png")
