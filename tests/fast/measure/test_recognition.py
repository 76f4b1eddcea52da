"""Face recognizers behind one interface, on real faces that ship in installed packages.

- dlib (independent of PVA): the same person (a photo and its mirror image; two template photos
  of one woman before and after an edit or an inpainting) is closer than dlib's 0.6 rule, and
  every same-person pair is closer than every pair of different people. The astronaut against
  the seven other people is farther than 0.6. (Measured: two pairs of different young women
  among ComfyUI's template portraits, lilac~wheat 0.52 and veil~turtleneck 0.57, also fall below
  0.6 with dlib, see the printed distances; dlib's own rule is not claimed for them.)
- ONNX ArcFace/CosFace: what onnxruntime computes equals the exported network applied to the
  ArcFace crop in insightface's input convention (RGB, (x - 127.5) / 127.5, or raw pixels for
  models that normalize inside), and the crop puts the detected landmarks on the template.
- The aligned mode reproduces the research code's fixed crop (resize to 256, rows 35..223,
  columns 32..220, pooled to 112).
- Bad input: a missing optional package says how to install it; a missing or damaged model file
  and a reference without a face are named; a result without a face scores None, not a crash.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness.portraits import SAME_PERSON_PAIRS, SINGLE_PORTRAITS, portrait
from harness.tiny_models import export_onnx, tiny_arcface

from pva.errors import NoFaceFoundError, PVAError, PVAWeightsError
from pva.faces.detection import find_faces
from pva.measure.recognition import (
    FaceLocator,
    aligned_face,
    load_recognizer,
    reference_features,
    score_photos,
)
from pva.measure.recognition.alignment import ARCFACE_TEMPLATE, arcface_crop, similarity_transform
from pva.measure.recognition.base import cosine
from pva.measure.recognition.check import check_identity

DLIB_RULE = 0.6


def photo(name: str) -> torch.Tensor:
    return torch.from_numpy(portrait(name)).float() / 255


def mirror(image: torch.Tensor) -> torch.Tensor:
    return image.flip(1).contiguous()


@pytest.fixture(scope="module")
def dlib():
    return load_recognizer("dlib")


@pytest.fixture(scope="module")
def dlib_descriptors(dlib) -> dict[str, torch.Tensor]:
    """Raw dlib descriptors of every portrait (and the astronaut's mirror image), faces by MTCNN."""
    names = sorted(set(SINGLE_PORTRAITS) | {n for pair in SAME_PERSON_PAIRS for n in pair})
    photos = {n: photo(n) for n in names}
    photos["astronaut_mirror"] = mirror(photos["astronaut"])
    locator = FaceLocator()
    out = {}
    for name, image in photos.items():
        (face,) = locator.locate([image])
        assert face is not None, f"MTCNN found no face in {name}"
        out[name] = dlib.embed([image], [face])[0]
    return out


def test_dlib_tells_the_same_person_from_different_people(dlib_descriptors):
    d = dlib_descriptors

    def dist(a, b):
        return float((d[a] - d[b]).norm())

    same = [("astronaut", "astronaut_mirror"), *SAME_PERSON_PAIRS]
    different = list(itertools.combinations(SINGLE_PORTRAITS, 2))
    same_distances = {pair: dist(*pair) for pair in same}
    different_distances = {pair: dist(*pair) for pair in different}
    print(
        "\ndlib descriptor distances (same person):",
        {f"{a}~{b}": round(v, 3) for (a, b), v in same_distances.items()},
    )
    print(
        "different people:",
        {f"{a}~{b}": round(v, 3) for (a, b), v in sorted(different_distances.items(), key=lambda x: x[1])},
    )
    # measured: 0.192, 0.092, 0.245
    assert max(same_distances.values()) < DLIB_RULE
    # measured: astronaut is 0.655..0.887 from the seven others
    astronaut = [v for (a, b), v in different_distances.items() if "astronaut" in (a, b)]
    assert len(astronaut) == len(SINGLE_PORTRAITS) - 1 and min(astronaut) > DLIB_RULE
    # every same-person pair closer than every different pair (measured: 0.245 < 0.498)
    assert max(same_distances.values()) < min(different_distances.values()) - 0.2
    # the cosine similarity (what reports show) orders them the same way
    worst_same = min(float(cosine(d[a], d[b][None])[0]) for a, b in same)
    best_different = max(float(cosine(d[a], d[b][None])[0]) for a, b in different)
    assert worst_same > best_different


def test_dlib_verdict_and_scores_through_the_common_interface(dlib):
    astronaut, other = photo("astronaut"), photo("harbour")
    references = reference_features(dlib, [astronaut], FaceLocator())
    same, different, blank = score_photos(
        dlib, [mirror(astronaut), other, torch.full((256, 256, 3), 0.5)], references, FaceLocator()
    )
    assert same.verdict.startswith("same person") and "< 0.6" in same.verdict, same.verdict
    assert different.verdict.startswith("different person"), different.verdict
    assert same.similarity > different.similarity
    assert blank.face is None and blank.similarity is None  # no face: no score, no crash
    # the score is the cosine of the two descriptors, computed here independently
    a = dlib.embed([mirror(astronaut)], [same.face])[0].numpy()
    b = references[0].numpy()
    assert same.similarity == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-6)


def test_check_identity_summarizes_and_draws(dlib):
    astronaut = photo("astronaut")
    check = check_identity(
        [mirror(astronaut), torch.full((300, 200, 3), 0.5)], dlib, FaceLocator(), reference_images=[astronaut]
    )
    assert check.values[1] == 0.0 and check.values[0] > 0.9
    lines = check.summary.splitlines()
    assert "dlib" in lines[0] and "1 reference photo" in lines[0]
    assert lines[1].startswith(f"image 1: {check.values[0]:.3f}, same person")
    assert lines[2].startswith("image 2: no face found")
    # one IMAGE batch of the largest size; the drawing changed only the first photo's face box area
    assert check.annotated.shape == (2, 512, 512, 3)
    changed = (check.annotated[0] - mirror(astronaut)).abs().amax(-1) > 0.05
    x1, y1, x2, y2 = check.scores[0].face.box
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert changed.sum() > 100
    assert xs.min() >= x1 - 10 and xs.max() <= max(x2 + 10, x1 + 120) and ys.max() <= y2 + 10


def test_missing_reference_face_is_named(dlib):
    with pytest.raises(NoFaceFoundError, match=r"reference photo 2 of 2: no face found"):
        reference_features(dlib, [photo("astronaut"), torch.full((200, 200, 3), 0.5)], FaceLocator())


@pytest.mark.parametrize(
    ("module", "make", "hint"),
    [
        ("dlib", lambda: load_recognizer("dlib"), "pip install --no-deps dlib-bin==20.0.1.post1"),
        ("onnxruntime", lambda: load_recognizer("onnx:/nowhere.onnx"), "pip install onnxruntime==1.31.1"),
    ],
)
def test_missing_optional_package_says_how_to_install_it(monkeypatch, module, make, hint):
    from pva.measure.recognition import load as load_module

    monkeypatch.setattr(load_module, "_dlib", [])  # not the instance loaded by other tests
    monkeypatch.setitem(sys.modules, module, None)  # import of it now fails, as when not installed
    with pytest.raises(PVAError) as error:
        make()
    message = str(error.value)
    assert f"{module} is not installed" in message and hint in message and "keeps your torch" in message


# -- alignment ---------------------------------------------------------------------------------
def test_arcface_crop_puts_the_landmarks_where_the_similarity_warp_says():
    """MTCNN run again on the crop (at 224 px) finds the landmarks where the fitted similarity
    transform maps them, close to ArcFace's template (the fit is least squares: a wide smile
    leaves the mouth corners off it): the warp goes the right way round, in the right pixel
    convention."""
    image = photo("astronaut")
    (face,) = FaceLocator().locate([image])
    template = ARCFACE_TEMPLATE * 2
    matrix = similarity_transform(np.array(face.landmarks), template)
    mapped = np.array(face.landmarks) @ matrix[:, :2].T + matrix[:, 2]
    crop = arcface_crop(image, face, size=224).permute(1, 2, 0)
    found = np.array(find_faces(crop[None]).photos[0].faces[0].landmarks)
    error = np.linalg.norm(found - mapped, axis=1)
    print("\nlandmarks in the 224 px crop, found vs mapped (px):", error.round(2))
    print("mapped vs template (px):", np.linalg.norm(mapped - template, axis=1).round(2))
    assert error.max() < 4, error
    assert np.linalg.norm(mapped[:2] - template[:2], axis=1).max() < 6  # the eyes sit on the template
    # control: the mirror image warped with the unmirrored landmarks puts the face elsewhere
    wrong = arcface_crop(mirror(image), face, size=224).permute(1, 2, 0)
    missed = find_faces(wrong[None]).photos[0].faces
    assert not missed or np.linalg.norm(np.array(missed[0].landmarks) - mapped, axis=1).max() > 12


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ rotation.T + shift
    matrix = similarity_transform(points, moved)
    assert np.allclose(matrix[:, :2], rotation) and np.allclose(matrix[:, 2], shift)


def test_aligned_mode_is_the_research_codes_fixed_crop():
    """Resize to 256, rows 35..223, columns 32..220, average-pooled to 112 (the research code's
    IDSimilarity): the aligned face's ArcFace crop matches it on a smooth image."""
    smooth = F.interpolate(torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0)), size=(512, 512),
                           mode="bicubic", align_corners=False)[0].clamp(0, 1)  # fmt: skip
    photo_512 = smooth.permute(1, 2, 0)
    research = F.interpolate(smooth[None], (256, 256), mode="bilinear", align_corners=True)[
        :, :, 35:223, 32:220
    ]
    research = F.adaptive_avg_pool2d(research, (112, 112))[0]
    ours = arcface_crop(photo_512, aligned_face(512, 512))
    difference = (ours - research).abs().mean().item()
    shifted = arcface_crop(photo_512, aligned_face(512, 512, (40 / 256, 35 / 256, 228 / 256, 223 / 256)))
    control = (shifted - research).abs().mean().item()
    print(f"\naligned crop vs research crop: {difference:.4f} (crop shifted by 8/256: {control:.4f})")
    assert difference < 0.01 and control > 3 * difference


# -- ONNX --------------------------------------------------------------------------------------
class _Normalizing(torch.nn.Module):
    """Subtracts and multiplies first, as insightface's models that take 0..255 pixels do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - 127.5) * 0.0078125)


@pytest.mark.parametrize("normalizes_itself", [False, True])
def test_onnx_recognizer_feeds_insightface_input_convention(tmp_path, normalizes_itself):
    net = tiny_arcface(0)
    exported = _Normalizing(net) if normalizes_itself else net
    recognizer = load_recognizer(f"onnx:{export_onnx(exported, tmp_path / 'tiny.onnx')}")
    assert recognizer.raw_pixels is normalizes_itself and recognizer.size == 112
    images = [photo("astronaut"), photo("turtleneck")]
    faces = FaceLocator().locate(images)
    crops = torch.stack([arcface_crop(p, f) for p, f in zip(images, faces, strict=True)])
    # the exported network applied to what it should be fed
    expected = (exported(crops * 255) if normalizes_itself else net((crops * 255 - 127.5) / 127.5)).detach()
    got = recognizer.embed(images, faces)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # controls: fed BGR instead of RGB, or the other pixel range, it gives other features
    assert not torch.allclose(net((crops.flip(1) * 255 - 127.5) / 127.5), expected, atol=1e-2)
    other_range = exported((crops * 255 - 127.5) / 127.5) if normalizes_itself else net(crops * 255)
    assert not torch.allclose(other_range, expected, atol=1e-2)


def test_onnx_recognizer_bad_files(tmp_path):
    with pytest.raises(PVAWeightsError, match="not found"):
        load_recognizer(f"onnx:{tmp_path / 'missing.onnx'}")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(PVAWeightsError, match="cannot be loaded"):
        load_recognizer(f"onnx:{garbage}")
    with pytest.raises(PVAError, match="is not one of"):
        load_recognizer("cosface")


def test_facenet_recognizer_is_the_packs_one_embedding_path(tmp_path):
    from harness.checkpoints import facenet_random_weights

    from pva.faces.embeddings import embed_photos
    from pva.faces.facenet import load_facenet

    facenet = load_facenet(facenet_random_weights())
    recognizer = load_recognizer("facenet", facenet=facenet)
    assert not recognizer.independent and "not independent" in recognizer.label
    image = photo("astronaut")
    located = FaceLocator().locate([image])
    assert torch.equal(recognizer.embed([image], located), embed_photos([image], facenet).embeddings)
    with pytest.raises(PVAError, match="connect a FACENET"):
        load_recognizer("facenet")
