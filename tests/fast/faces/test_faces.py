"""Face detection, alignment and masks on a real photo (skimage's astronaut) with the real MTCNN."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import pva.faces.detection as faces
from pva.errors import NoFaceFoundError, PVAError


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(skimage_data.astronaut().copy()).float().div(255)[None]  # [1,512,512,3]


def to_image(crops: torch.Tensor) -> torch.Tensor:
    """Standardized [B,3,H,W] crops back to a ComfyUI IMAGE [B,H,W,3] in 0..1."""
    return ((crops * 128 + 127.5) / 255).clamp(0, 1).permute(0, 2, 3, 1)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    chw = image.permute(0, 3, 1, 2)
    return F.interpolate(chw, size=(height, width), mode="bilinear", antialias=True).permute(0, 2, 3, 1)


def one_face_each(images, threshold: float = 0.9, face_index: int = 0) -> list:
    """What Encode Identity asks of the detector: the face_index-th face (largest first) of every
    reference photo, or an error naming the photo that lacks it."""
    found = faces.find_faces(images, faces.DetectionSettings(threshold=threshold), what="reference images")
    faces.require_faces(found, (face_index,), "reference photo", threshold)
    return [photo.faces[face_index] for photo in found.photos]


def test_detects_the_astronaut(astronaut):
    (face,) = one_face_each(astronaut)
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert 40 < x2 - x1 < 200 and 40 < y2 - y1 < 200
    assert face.probability > 0.99
    assert len(face.landmarks) == 5
    for x, y in face.landmarks:
        assert x1 <= x <= x2 and y1 <= y <= y2
    (lex, ley), (rex, rey), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert lex < rex and mlx < mrx
    assert max(ley, rey) < ny < min(mly, mry)  # eyes above nose above mouth
    assert abs(math.degrees(face.eye_angle)) < 5


def test_crop_shape_and_standardization(astronaut):
    detected = one_face_each(astronaut)
    crops = faces.align_faces(astronaut, detected)
    assert crops.shape == (1, 3, 160, 160) and crops.dtype == torch.float32
    assert crops.min() >= -127.5 / 128 - 1e-6 and crops.max() <= 127.5 / 128 + 1e-6
    # a face crop is not flat and uses much of the range
    assert crops.std() > 0.2
    assert faces.align_faces(astronaut, detected, size=96).shape == (1, 3, 96, 96)


def test_alignment_geometry_is_exact():
    # A photo whose pixels hold their own coordinates: the crop must sample exactly
    # c + side/2 * R(angle) (u, v), with zeros outside the photo.
    h, w = 120, 200
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    image = torch.stack([xs / w, ys / h, torch.full_like(xs, 0.5)], dim=-1)[None]
    angle = math.radians(20)
    eye = 10 * torch.tensor([math.cos(angle), math.sin(angle)])
    face = faces.DetectedFace(
        box=(80.0, 30.0, 120.0, 80.0),  # centre (100, 55), side 50 -> 60 with margin 0.1
        landmarks=((90.0, 50.0), (90.0 + eye[0].item(), 50.0 + eye[1].item()), (0, 0), (0, 0), (0, 0)),
        probability=1.0,
    )
    size = 32
    out = to_image(faces.align_faces(image, [face], size=size, margin=0.1))[0]
    u = (torch.arange(size) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(u, u, indexing="ij")
    side = 60
    x = 100 + side / 2 * (math.cos(angle) * u - math.sin(angle) * v)
    y = 55 + side / 2 * (math.sin(angle) * u + math.cos(angle) * v)
    torch.testing.assert_close(out[..., 0], x / w, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., 1], y / h, atol=1e-4, rtol=0)

    # the same face near the photo's corner: outside is black (zero padding)
    corner = faces.DetectedFace(box=(-30.0, -30.0, 10.0, 10.0), landmarks=face.landmarks, probability=1.0)
    out = to_image(faces.align_faces(image, [corner], size=size, margin=0.0))[0]
    assert out[0, 0].abs().max() == 0 and out[-1, -1].abs().max() > 0


def test_alignment_levels_tilted_eyes(astronaut):
    tilted = TF.rotate(astronaut.permute(0, 3, 1, 2), 15, interpolation=TF.InterpolationMode.BILINEAR)
    tilted = tilted.permute(0, 2, 3, 1)
    (face,) = one_face_each(tilted)
    assert abs(abs(math.degrees(face.eye_angle)) - 15) < 4  # the detector sees the tilt

    crop = to_image(faces.align_faces(tilted, [face], size=256))
    (again,) = one_face_each(crop)
    assert abs(math.degrees(again.eye_angle)) < 3  # rotating the wrong way would give ~30 degrees
    # the face fills the crop: box about 1 / (1 + 2 * margin) of the side, roughly centred
    x1, y1, x2, y2 = again.box
    assert 0.45 < (x2 - x1) / 256 < 0.9
    assert abs((x1 + x2) / 2 - 128) < 30 and abs((y1 + y2) / 2 - 128) < 40


def test_largest_face_and_face_index(astronaut):
    face_patch = astronaut[:, 30:210, 135:315]  # 180x180 around the astronaut's face
    canvas = torch.full((1, 400, 640, 3), 0.5)
    canvas[:, 20:380, 240:600] = resize(face_patch, 360, 360)  # big copy, right
    canvas[:, 150:270, 40:160] = resize(face_patch, 120, 120)  # small copy, left

    (largest,) = one_face_each(canvas)
    assert largest.box[0] > 240
    (second,) = one_face_each(canvas, face_index=1)
    assert second.box[2] < 160
    assert largest.area > 4 * second.area
    assert one_face_each(canvas, face_index=0) == [largest]

    with pytest.raises(PVAError, match=r"reference photo 1 of 1: face index 2 .*only 2 face"):
        one_face_each(canvas, face_index=2)


def test_list_of_photos_of_different_sizes(astronaut):
    half = resize(astronaut, 256, 256)
    big, small = one_face_each([astronaut, half])
    for a, b in zip(big.box, small.box, strict=True):
        assert abs(a / 2 - b) < 8
    crops = faces.align_faces([astronaut, half], [big, small])
    assert crops.shape == (2, 3, 160, 160)
    assert (crops[0] - crops[1]).abs().mean() < 0.15  # the same face, aligned the same way
    # a list item may also be a single [H,W,3] photo
    assert len(one_face_each([astronaut[0], half])) == 2


def test_no_face_names_the_reference(astronaut):
    noise = torch.rand(1, 300, 200, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NoFaceFoundError) as error:
        one_face_each([astronaut, noise, astronaut])
    message = str(error.value)
    assert "reference photo 2 of 3: no face found" in message
    assert "threshold 0.9" in message and "lower the detection threshold" in message

    blank = torch.zeros(2, 64, 64, 3)
    with pytest.raises(NoFaceFoundError, match=r"reference photo 1 of 2: .*threshold 0\.95"):
        one_face_each(blank, threshold=0.95)
    with pytest.raises(NoFaceFoundError, match="reference photo 1 of 1"):
        one_face_each(torch.ones(1, 12, 12, 3))  # smaller than MTCNN's smallest face


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(64, 64, 3),  # no batch dimension
        torch.zeros(1, 64, 64, 4),  # RGBA
        torch.zeros(1, 3, 64, 64),  # channels first
        torch.zeros(0, 64, 64, 3),  # empty batch
        torch.zeros(1, 0, 64, 3),
        [],
        [torch.zeros(1, 64, 64)],
        "photo.png",
    ],
)
def test_bad_shapes_name_the_input(images):
    with pytest.raises(PVAError, match="reference images"):
        one_face_each(images)


def test_bad_arguments(astronaut):
    with pytest.raises(PVAError, match="threshold"):
        one_face_each(astronaut, threshold=1.5)
    face = faces.DetectedFace(box=(0.0, 0.0, 10.0, 10.0), landmarks=((0, 0),) * 5, probability=1.0)
    with pytest.raises(PVAError, match="2 photos but 1 detected faces"):
        faces.align_faces(torch.zeros(2, 64, 64, 3), [face])


# -- detection that does not give up early, order and selection -------------------------------
def _portrait(name: str) -> torch.Tensor:
    from harness.portraits import portrait

    return torch.from_numpy(portrait(name)).float().div(255)[None]


def _found(images, **settings) -> list[faces.DetectedFace]:
    return list(faces.find_faces(images, faces.DetectionSettings(**settings)).photos[0].faces)


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_sideways_or_upside_down_photo_is_found_with_its_landmarks_in_place(astronaut, turns):
    """MTCNN only finds upright faces; the retry ladder turns the photo and maps the face back."""
    (upright,) = _found(astronaut)
    photo = torch.rot90(astronaut, turns, (1, 2))  # counter-clockwise, `turns` quarter turns

    def moved(x, y):  # where a point of the upright photo lands after the turns
        for _ in range(turns):
            x, y = y, 512 - x
        return x, y

    def error(face):
        return max(
            max(abs(x - gx), abs(y - gy))
            for (x, y), (gx, gy) in zip((moved(*p) for p in upright.landmarks), face.landmarks, strict=True)
        )

    # The control: MTCNN alone gives up, or finds the face with landmarks far off.
    raw = _found(photo, retry=False)
    assert raw == [] or error(raw[0]) > 15
    (face,) = _found(photo)
    assert error(face) < 8  # 1.5 % of the photo
    assert abs(math.degrees(face.eye_angle - upright.eye_angle) % 360 - (360 - 90 * turns)) < 5


def test_tiny_faces_are_found_when_the_minimum_size_allows(astronaut):
    small = resize(astronaut, 48, 48)  # the face is about 10 px wide
    canvas = torch.full((1, 300, 300, 3), 0.45)
    canvas[:, 120:168, 100:148] = small
    assert _found(canvas) == []  # below the default minimum face size (20 px)
    (face,) = _found(canvas, min_face_size=8)
    assert 100 < face.center[0] < 148 and 120 < face.center[1] < 168


def test_a_flat_low_contrast_photo_is_found_after_stretching(astronaut):
    flat = 0.5 + (astronaut - 0.5) * 0.08
    assert _found(flat, retry=False) == []
    (face,) = _found(flat)
    (upright,) = _found(astronaut)
    assert all(abs(a - b) < 8 for a, b in zip(face.box, upright.box, strict=True))


def test_a_face_cut_by_the_frame_gets_the_box_and_landmarks_of_the_whole_face():
    """MTCNN's box for a face cut by the photo's edge leaves the photo by a third of the face and
    drags the landmarks with it; the pack finds such faces again on a padded copy."""
    photo = _portrait("turtleneck")
    (face,) = _found(photo)
    pad = 150
    padded = torch.nn.functional.pad(photo.permute(0, 3, 1, 2), (pad,) * 4, mode="replicate")
    (whole,) = _found(padded.permute(0, 2, 3, 1))
    for (x, y), (wx, wy) in zip(face.landmarks, whole.landmarks, strict=True):
        assert abs(x - (wx - pad)) < 8 and abs(y - (wy - pad)) < 8


def test_order_and_minimum_size_on_a_photo_with_two_faces():
    photo = _portrait("desk_two_faces")
    big, small = _found(photo)  # largest first
    assert big.area > 3 * small.area
    assert _found(photo, order="left to right") == sorted([big, small], key=lambda f: f.center[0])
    assert _found(photo, order="top to bottom") == sorted([big, small], key=lambda f: f.center[1])
    (only,) = _found(photo, min_face_size=100)  # (another pyramid: nearly the same box)
    assert faces._iou(only, big) > 0.9


def test_selection():
    assert faces.parse_selection("all") is None and faces.parse_selection(" ") is None
    assert faces.parse_selection("1") == (1,)
    assert faces.parse_selection("0, 2") == (0, 2)
    assert faces.parse_selection("1-3,0") == (1, 2, 3, 0)
    assert faces.parse_selection("2,2") == (2,)
    for bad in ("first", "3-1", "-1", "1,,2"):
        with pytest.raises(PVAError, match="faces: .* is not a face selection|negative index"):
            faces.parse_selection(bad)
    one = faces.DetectedFace(box=(0.0, 0.0, 30.0, 30.0), landmarks=((0, 0),) * 5, probability=1.0)
    two = faces.DetectedFace(box=(40.0, 0.0, 60.0, 20.0), landmarks=((0, 0),) * 5, probability=1.0)
    found = faces.Faces((faces.PhotoFaces(64, 64, (one, two)), faces.PhotoFaces(64, 64, (one,))))
    assert found.select((1,)).photos == (faces.PhotoFaces(64, 64, (two,)), faces.PhotoFaces(64, 64, ()))
    assert found.select(None) is found and found.count == 3
    assert found.pairs() == [(0, one), (0, two), (1, one)]
    with pytest.raises(PVAError, match=r"photo 2 of 2: face index 1 asked for, but only 1 face"):
        faces.require_faces(found, (1,), "photo", 0.9)
    with pytest.raises(PVAError, match="the faces were found in 2 photo"):
        found.check_images([torch.zeros(32, 32, 3)] * 2, "image")


def test_a_photo_without_faces_has_none():
    found = faces.find_faces(torch.full((2, 96, 96, 3), 0.5))
    assert [p.faces for p in found.photos] == [(), ()] and found.count == 0
    with pytest.raises(NoFaceFoundError, match="photo 1 of 2: no face found"):
        faces.require_faces(found, None, "photo", 0.9)
    with pytest.raises(PVAError, match="order: must be one of"):
        faces.find_faces(torch.zeros(1, 64, 64, 3), faces.DetectionSettings(order="random"))
    with pytest.raises(PVAError, match="min_face_size"):
        faces.find_faces(torch.zeros(1, 64, 64, 3), faces.DetectionSettings(min_face_size=0))
