"""Crop faces out of large photos and paste them back, on real faces placed small in 1536 px
photos (with the real MTCNN): what comes back, what stays exactly as it was."""

import math

import pytest
import torch
from harness.models import tiny_model
from harness.portraits import canvas_with_portraits

from pva.errors import PVAError
from pva.faces.crops import crop_faces, crop_square, paste_faces
from pva.faces.detection import DetectedFace, DetectionSettings, Faces, PhotoFaces, find_faces
from pva.faces.regions import face_masks, grow_mask, region_mask
from pva.method.layers import native_resolution

FEATHER = 8
RED = torch.tensor([1.0, 0.0, 0.0])


def as_image(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).float().div(255)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two 1536x1536 photos: two people (one face about 45 px, one about 180 px) and one person."""
    two = canvas_with_portraits(1536, 1536, [("astronaut", 200, 800, 256), ("veil", 900, 300, 384)])
    one = canvas_with_portraits(1536, 1536, [("harbour", 600, 1000, 200)])
    return torch.stack([as_image(two), as_image(one)])


@pytest.fixture(scope="module")
def faces(photos) -> Faces:
    found = find_faces(photos, DetectionSettings(order="left to right"))
    assert [len(p.faces) for p in found.photos] == [2, 1], found
    return found


def reach(info, feather: int) -> torch.Tensor:
    """[B, H, W] bool: where a paste may change pixels, worked out from the faces (not from the
    paste): each face's whole-face ellipse grown by the feather (in photo pixels) and 2 px."""
    height, width = info.photo_sizes[0]
    out = torch.zeros(len(info.photo_sizes), height, width, dtype=torch.bool)
    for crop in info.crops:
        mask = region_mask(crop.face, "whole face", height, width)
        grow = math.ceil(feather * crop.square.side / info.resolution) + 2
        out[crop.photo] |= grow_mask(mask, grow) > 0
    return out


def core(info, feather: int) -> torch.Tensor:
    """[B, H, W] bool: deep inside each face's ellipse, where a paste shows only the crop."""
    height, width = info.photo_sizes[0]
    out = torch.zeros(len(info.photo_sizes), height, width, dtype=torch.bool)
    for crop in info.crops:
        mask = region_mask(crop.face, "whole face", height, width)
        shrink = math.ceil(feather * crop.square.side / info.resolution) + 2
        out[crop.photo] |= grow_mask(mask, -shrink) > 0
    return out


def test_round_trip_with_nothing_sampled_returns_the_photos(photos, faces):
    """At 512 every face is enlarged into its crop: the photos come back within 1/255 (float
    precision), and exactly outside the feathered masks."""
    crops, info = crop_faces(photos, faces, 512, context=2.0)
    assert crops.shape == (3, 512, 512, 3)
    assert [c.photo for c in info.crops] == [0, 0, 1]
    assert all(c.square.side <= 512 for c in info.crops)
    out = paste_faces(photos, crops, info, feather=FEATHER)
    assert out.shape == photos.shape
    outside = ~reach(info, FEATHER)
    assert torch.equal(out.masked_select(outside[..., None]), photos.masked_select(outside[..., None]))
    error = (out - photos).abs().max().item()
    print(
        f"\n[crop-paste] round trip, faces enlarged into 512 crops: largest difference {error * 255:.1e} / 255"
    )
    assert error <= 1 / 255


def test_a_face_reduced_into_its_crop_comes_back_at_the_crops_resolution(photos, faces):
    """At 256 the large face (about 180 px, a 360 px square) is reduced: its detail finer than
    the crop is lost (a known limit); the enlarged faces still come back within 1/255."""
    crops, info = crop_faces(photos, faces, 256, context=2.0)
    out = paste_faces(photos, crops, info, feather=FEATHER)
    (reduced,) = [k for k, c in enumerate(info.crops) if c.square.side > 256]
    height, width = info.photo_sizes[0]
    for k, crop in enumerate(info.crops):
        ellipse = region_mask(crop.face, "whole face", height, width) > 0
        error = (out[crop.photo][ellipse] - photos[crop.photo][ellipse]).abs()
        if k == reduced:
            print(f"\n[crop-paste] face reduced {crop.square.side / 256:.2f}x: mean difference "
                  f"{error.mean() * 255:.2f} / 255, largest {error.max() * 255:.0f} / 255")  # fmt: skip
            assert error.mean() > 1 / 255
        else:
            assert error.max() <= 1 / 255


def test_pasted_crops_show_inside_the_masks_and_nothing_changes_outside(photos, faces):
    crops, info = crop_faces(photos, faces, 256, context=2.0)
    painted = RED.expand_as(crops).clone()
    out = paste_faces(photos, painted, info, feather=FEATHER)
    outside = ~reach(info, FEATHER)
    assert torch.equal(out.masked_select(outside[..., None]), photos.masked_select(outside[..., None]))
    inside = core(info, FEATHER)
    assert (out[inside] - RED).abs().max() <= 1 / 255
    # every face got its crop: the red area of each face is most of its ellipse
    height, width = info.photo_sizes[0]
    for crop in info.crops:
        ellipse = region_mask(crop.face, "whole face", height, width) > 0
        red = ((out[crop.photo] - RED).abs().amax(-1) <= 1 / 255) & ellipse
        assert red.sum() >= 0.6 * ellipse.sum(), (crop, red.sum().item(), ellipse.sum().item())


def test_feather_widens_the_blend_band(photos, faces):
    """Half-blended pixels (between the photo and the pasted red) form a band at the mask's
    edge: about the resampling's width without feathering, much wider with it."""
    crops, info = crop_faces(photos[1:], Faces(faces.photos[1:], faces.order), 256)
    painted = RED.expand_as(crops).clone()

    def band(feather: int) -> int:
        out = paste_faces(photos[1:], painted, info, feather=feather)
        changed = (out - photos[1:]).abs().amax(-1) > 1 / 255
        red = (out - RED).abs().amax(-1) <= 1 / 255
        return int((changed & ~red).sum())

    hard, soft = band(0), band(24)
    print(f"\n[crop-paste] blended pixels at the edge: feather 0 -> {hard}, feather 24 -> {soft}")
    assert soft > 3 * hard


def test_crops_hold_the_faces_where_the_crop_info_says(photos, faces):
    crops, info = crop_faces(photos, faces, 256, context=2.0)
    again = find_faces(crops.clamp(0, 1))
    for k, crop in enumerate(info.crops):
        expected = crop.face_in_crop(256)
        (found,) = again.photos[k].faces
        assert (
            abs(found.center[0] - expected.center[0]) < 12 and abs(found.center[1] - expected.center[1]) < 12
        )
        assert 0.8 < found.size / expected.size < 1.25
        # context 2: the face is about half the crop
        assert 0.35 < expected.size / 256 < 0.6
    assert [len(p.faces) for p in info.faces().photos] == [1, 1, 1]


def test_small_faces_are_skipped_or_upscaled(photos, faces):
    sizes = sorted(face.size for _, face in faces.pairs())
    threshold = (sizes[0] + sizes[1]) / 2
    skipped_crops, skipped = crop_faces(photos, faces, 256, min_face_size=threshold, small_faces="skip")
    assert skipped.count == 2 and all(c.face.size >= threshold for c in skipped.crops)
    _, upscaled = crop_faces(photos, faces, 256, min_face_size=threshold, small_faces="upscale")
    assert upscaled.count == 3
    out = paste_faces(photos, RED.expand_as(skipped_crops).clone(), skipped, feather=FEATHER)
    (small,) = [face for _, face in faces.pairs() if face.size < threshold]
    untouched = grow_mask(region_mask(small, "whole face", 1536, 1536), 20) > 0
    assert torch.equal(out[0][untouched], photos[0][untouched])


def test_no_face_anywhere_passes_the_photos_through(photos):
    nobody = Faces((PhotoFaces(1536, 1536, ()), PhotoFaces(1536, 1536, ())))
    crops, info = crop_faces(photos, nobody, 256)
    assert info.placeholder and info.count == 0 and crops.shape == (1, 256, 256, 3)
    assert info.masks.shape == (1, 256, 256) and info.masks.abs().max() == 0
    assert info.faces().count == 0
    assert torch.equal(paste_faces(photos, RED.expand_as(crops).clone(), info), photos)


def test_photo_masks_are_cut_with_their_faces(photos, faces):
    per_face = face_masks(faces, ["mouth"], per_face=True)
    _, info = crop_faces(photos[:1].expand(2, -1, -1, -1), _same_photo_twice(faces), 512, masks=per_face[:2])
    for k, crop in enumerate(info.crops):
        expected = region_mask(crop.face_in_crop(512), "mouth", 512, 512)
        got = info.masks[k] > 0.5
        iou = (got & (expected > 0)).sum() / (got | (expected > 0)).sum()
        assert iou > 0.8, (k, iou)
    # one mask for every face, or one per photo, are accepted too; a mask of another size is not
    crop_faces(photos, faces, 256, masks=per_face[:1])
    crop_faces(photos, faces, 256, masks=face_masks(faces, ["eyes"]))
    with pytest.raises(PVAError, match="mask: it is 64x64, the image 1536x1536"):
        crop_faces(photos, faces, 256, masks=torch.ones(1, 64, 64))


def _same_photo_twice(faces: Faces) -> Faces:
    return Faces((faces.photos[0], PhotoFaces(1536, 1536, ())), faces.order)


def test_crop_squares_stay_inside_the_photo_where_they_fit():
    def face(x1, y1, x2, y2):
        return DetectedFace((x1, y1, x2, y2), ((0, 0),) * 5, 1.0)

    assert crop_square(face(100, 100, 200, 200), 2.0, 1000, 1000).__dict__ == {"x": 50, "y": 50, "side": 200}
    assert crop_square(face(0, 10, 100, 110), 2.0, 1000, 1000).__dict__ == {"x": 0, "y": 0, "side": 200}
    assert crop_square(face(900, 880, 1000, 990), 2.0, 1000, 1000).__dict__ == {
        "x": 780,
        "y": 780,
        "side": 220,
    }
    # larger than the photo's height: it covers the whole height (the crop repeats the edges)
    wide = crop_square(face(400, 0, 700, 300), 2.0, 300, 1000)
    assert wide.side == 600 and wide.y == -150 and wide.x == 250  # centred on the face: rows -150..450


def test_round_trip_of_a_square_larger_than_the_photo_is_exact():
    photo = torch.rand(1, 120, 400, 3, generator=torch.Generator().manual_seed(0))
    faces = Faces((PhotoFaces(120, 400, (DetectedFace((150, 20, 250, 100), ((0, 0),) * 5, 1.0),)),))
    crops, info = crop_faces(photo, faces, 512, context=2.0)
    assert info.crops[0].square.side == 200 and info.crops[0].square.y < 0
    assert (paste_faces(photo, crops, info) - photo).abs().max() <= 1 / 255


@pytest.mark.parametrize(("family", "side"), [("sd15", 512), ("sd20", 512), ("sd20v", 768), ("sdxl", 1024)])
def test_native_resolution_of_each_family(family, side):
    assert native_resolution(tiny_model(family)) == side


def test_bad_input_is_named(photos, faces):
    with pytest.raises(PVAError, match="resolution: got 500; use a multiple of 8"):
        crop_faces(photos, faces, 500)
    with pytest.raises(PVAError, match="context: got 0.5"):
        crop_faces(photos, faces, 256, context=0.5)
    with pytest.raises(PVAError, match="image: the faces were found in 2 photo"):
        crop_faces(photos[:1], faces, 256)
    crops, info = crop_faces(photos, faces, 256)
    with pytest.raises(PVAError, match=r"crops: 2 given for 3 cropped face\(s\)"):
        paste_faces(photos, crops[:2], info)
    with pytest.raises(PVAError, match="image: the crops were cut from 2 photo"):
        paste_faces(photos[:1], crops, info)
    # crops that came back at another size (e.g. through an upscaler) are resized, not refused
    resized = torch.nn.functional.interpolate(crops.permute(0, 3, 1, 2), size=(320, 320)).permute(0, 2, 3, 1)
    assert paste_faces(photos, resized, info).shape == photos.shape


def test_personalization_trains_on_the_same_kind_of_crop(photos, faces):
    """Quick personalization cuts its training crops with Crop Faces' own path: the same
    pixels (kept in 0..1) and a whole-face mask where the face is in the crop."""
    from facenet_pytorch import InceptionResnetV1

    from pva.training.data import prepare_personalization_data

    torch.manual_seed(0)
    facenet = InceptionResnetV1().eval()
    data = prepare_personalization_data(photos[1:], facenet, resolution=256)
    crops, info = crop_faces(photos[1:], Faces(faces.photos[1:], faces.order), 256)
    assert torch.equal(data.pixels, crops.clamp(0, 1))
    assert torch.equal(data.masks[0], region_mask(info.crops[0].face_in_crop(256), "whole face", 256, 256))
