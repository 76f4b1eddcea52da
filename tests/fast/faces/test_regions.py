"""Facial-region masks on real faces (scikit-image's astronaut and portraits from ComfyUI's
template packages), with the real MTCNN landmarks."""

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from harness.portraits import portrait

from pva.errors import PVAError
from pva.faces.detection import DetectedFace, Faces, PhotoFaces, find_faces
from pva.faces.regions import REGIONS, face_masks, feather_mask, grow_mask, region_mask, whole_face

UPRIGHT = ("astronaut", "veil", "lilac", "turtleneck")


def photo(name: str) -> torch.Tensor:
    return torch.from_numpy(portrait(name)).float().div(255)


def turned(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """[H,W,3] or [H,W] turned counter-clockwise about the centre (same size)."""
    chw = image.permute(2, 0, 1) if image.dim() == 3 else image[None]
    out = TF.rotate(chw, degrees, interpolation=TF.InterpolationMode.BILINEAR)
    return out.permute(1, 2, 0) if image.dim() == 3 else out[0]


def largest_face(image: torch.Tensor) -> DetectedFace:
    return find_faces(image[None]).photos[0].faces[0]


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = mask.nonzero(as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


def principal_angle(mask: torch.Tensor) -> float:
    """Orientation of the mask's long axis, degrees."""
    ys, xs = mask.nonzero(as_tuple=True)
    x, y = xs.float() - xs.float().mean(), ys.float() - ys.float().mean()
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > 0.5) & (b > 0.5)).sum().item() / ((a > 0.5) | (b > 0.5)).sum().item()


@pytest.mark.parametrize("name", UPRIGHT)
def test_regions_sit_where_the_face_parts_are(name):
    image = photo(name)
    height, width = image.shape[:2]
    face = largest_face(image)
    masks = {r: region_mask(face, r, height, width) for r in REGIONS}
    for region, mask in masks.items():
        assert mask.shape == (height, width) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}, region
    # The parts lie inside the face box (a few pixels of slack for the drawn outline).
    x1, y1, x2, y2 = face.box
    slack = 0.04 * face.size
    for region in ("eyes and brows", "eyes", "nose", "mouth"):
        bx1, by1, bx2, by2 = bounding_box(masks[region])
        assert bx1 >= x1 - slack and by1 >= y1 - slack and bx2 <= x2 + slack and by2 <= y2 + slack, region
    # Each part covers its landmarks, and nothing of the others' centres.
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert masks["eyes"][int(ly), int(lx)] == 1 and masks["eyes"][int(ry), int(rx)] == 1
    assert masks["eyes"][int((ly + ry) / 2), int((lx + rx) / 2)] == 0  # two eyes, not one band
    assert masks["nose"][int(ny), int(nx)] == 1
    assert masks["mouth"][int((mly + mry) / 2), int((mlx + mrx) / 2)] == 1
    assert masks["eyes"][int(ny), int(nx)] == 0 and masks["mouth"][int(ly), int(lx)] == 0
    # eyes above nose above mouth; the brows band reaches above the eyes
    eyes_y, nose_y, mouth_y = (centroid(masks[r])[1] for r in ("eyes", "nose", "mouth"))
    assert eyes_y < nose_y < mouth_y
    assert bounding_box(masks["eyes and brows"])[1] < bounding_box(masks["eyes"])[1] - 0.05 * face.size
    # the lower face is below the eye line (along the face's own axis: heads tilt), holds the
    # nose tip and the mouth, and lies in the whole face
    ys, xs = masks["lower face"].nonzero(as_tuple=True)
    angle = face.eye_angle
    below = (xs + 0.5 - (lx + rx) / 2) * -math.sin(angle) + (ys + 0.5 - (ly + ry) / 2) * math.cos(angle)
    assert below.min() > 0.1 * math.hypot(rx - lx, ry - ly)
    assert masks["lower face"][int(ny), int(nx)] == 1 and masks["lower face"][int(mly), int(mlx)] == 1
    assert (masks["lower face"] <= masks["whole face"]).all()
    assert masks["lower face"].sum() < 0.75 * masks["whole face"].sum()


@pytest.mark.parametrize("name", UPRIGHT)
def test_regions_follow_the_face_when_the_photo_turns(name):
    image = photo(name)
    height, width = image.shape[:2]
    face, face_turned = largest_face(image), largest_face(turned(image, 15))
    for region in REGIONS:
        expected = turned(region_mask(face, region, height, width), 15)
        got = region_mask(face_turned, region, height, width)
        assert iou(expected, got) >= 0.8, (region, iou(expected, got))
    # The eye band turned with the face (an axis-aligned band would keep its angle).
    before = principal_angle(region_mask(face, "eyes and brows", height, width))
    after = principal_angle(region_mask(face_turned, "eyes and brows", height, width))
    assert abs((before - after) - 15) < 3, (before, after)


def test_precision_goes_from_the_shape_to_its_bounding_box():
    image = photo("astronaut")
    height, width = image.shape[:2]
    face = largest_face(image)
    for region in REGIONS:
        exact = region_mask(face, region, height, width, precision=0.0)
        x1, y1, x2, y2 = bounding_box(exact)
        box = torch.zeros(height, width)
        box[y1:y2, x1:x2] = 1
        assert torch.equal(region_mask(face, region, height, width, precision=1.0), box), region
        previous = exact
        for precision in (0.25, 0.5, 0.75, 1.0):
            mask = region_mask(face, region, height, width, precision=precision)
            assert (mask >= previous).all(), (region, precision)  # only grows, from the shape on
            assert (mask <= box).all(), (region, precision)  # never beyond the box
            previous = mask
        middle = region_mask(face, region, height, width, precision=0.5).sum()
        assert exact.sum() < middle < box.sum(), region


def test_whole_face_is_the_grown_box_ellipse():
    image = photo("astronaut")
    face = largest_face(image)
    mask = region_mask(face, "whole face", 512, 512)
    x1, y1, x2, y2 = face.box
    assert mask[int((y1 + y2) / 2), int((x1 + x2) / 2)] == 1
    assert mask[0, 0] == 0 and mask[-1, -1] == 0
    # grown by 15 % on each side: the box's edge midpoints are inside, its corners are not
    assert mask[int((y1 + y2) / 2), int(x1) + 1] == 1 and mask[int(y1) + 1, int((x1 + x2) / 2)] == 1
    assert mask[int(y1), int(x1)] == 0
    ellipse_area = math.pi / 4 * (x2 - x1) * (y2 - y1) * 1.3**2
    assert abs(mask.sum().item() / ellipse_area - 1) < 0.03
    x, y = torch.meshgrid(torch.arange(512) + 0.5, torch.arange(512) + 0.5, indexing="xy")
    assert (whole_face(face, grow=0.0)(x, y) <= 1).sum() < mask.sum()
    # a face at the photo's edge is clipped, not an error
    edge = DetectedFace(box=(-20.0, 40.0, 30.0, 100.0), landmarks=face.landmarks, probability=1.0)
    clipped = region_mask(edge, "whole face", 120, 80)
    assert clipped.shape == (120, 80) and clipped[70, 0] == 1 and clipped[70, -1] == 0
    # a face entirely outside gives an empty mask at any precision
    gone = DetectedFace(box=(500.0, 500.0, 600.0, 600.0), landmarks=face.landmarks, probability=1.0)
    assert region_mask(gone, "whole face", 120, 80, precision=1.0).sum() == 0


def test_grow_and_feather_in_pixels():
    mask = torch.zeros(1, 64, 64)
    mask[0, 20:40, 10:30] = 1
    grown = grow_mask(mask, 3)
    assert bounding_box(grown[0]) == (7, 17, 33, 43) and set(grown.unique().tolist()) == {0.0, 1.0}
    shrunk = grow_mask(mask, -3)
    assert bounding_box(shrunk[0]) == (13, 23, 27, 37)
    assert torch.equal(grow_mask(mask, 0), mask)
    soft = feather_mask(mask, 4)
    # soft only in a band of about 4 px around the edge; hard 0 / 1 farther away
    assert soft[0, 30, 20] == 1 and soft[0, 30, 0] == 0 and soft[0, 5, 20] == 0
    assert 0 < soft[0, 30, 10] < 1 and 0 < soft[0, 30, 9] < 1
    assert soft[0, 30, 15] == pytest.approx(1, abs=1e-6) and soft[0, 30, 5] == pytest.approx(0, abs=1e-6)
    assert torch.equal(feather_mask(mask, 0), mask)


def test_per_face_masks_and_their_union_on_a_photo_with_two_faces():
    image = photo("desk_two_faces")
    found = find_faces(image[None])
    assert len(found.photos[0].faces) == 2
    per_face = face_masks(found, ["eyes", "mouth"], per_face=True)
    union = face_masks(found, ["eyes", "mouth"])
    assert per_face.shape == (2, *image.shape[:2]) and union.shape == (1, *image.shape[:2])
    assert torch.equal(union[0], per_face.amax(dim=0))
    assert (per_face[0] * per_face[1]).sum() == 0  # each face's regions are its own
    assert per_face[0].sum() > 2 * per_face[1].sum()  # largest first
    only_second = face_masks(found.select((1,)), ["eyes", "mouth"])
    assert torch.equal(only_second[0], per_face[1])


def test_bad_region_inputs_are_explained():
    face = DetectedFace(box=(10.0, 10.0, 50.0, 60.0), landmarks=((20, 30), (40, 30), (30, 40), (22, 50), (38, 50)), probability=1.0)  # fmt: skip
    with pytest.raises(PVAError, match="region: must be one of"):
        region_mask(face, "ears", 64, 64)
    with pytest.raises(PVAError, match="precision: must be between 0"):
        region_mask(face, "eyes", 64, 64, precision=1.5)
    faces = Faces((PhotoFaces(64, 64, (face,)),))
    with pytest.raises(PVAError, match="region: choose at least one"):
        face_masks(faces, [])
    mixed = Faces((PhotoFaces(64, 64, (face,)), PhotoFaces(32, 32, ())))
    with pytest.raises(PVAError, match="different sizes"):
        face_masks(mixed, ["eyes"])
    # a photo without faces gives an empty mask, not an error
    empty = face_masks(Faces((PhotoFaces(64, 64, (face,)), PhotoFaces(64, 64, ()))), ["eyes"])
    assert empty.shape == (2, 64, 64) and empty[1].sum() == 0 and empty[0].sum() > 0
