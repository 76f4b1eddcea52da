"""The face nodes (Detect Faces, Face Region Mask, Crop Faces, Paste Faces) as ComfyUI loads
them, called in-process on real photos with the real MTCNN."""

import pytest
import torch
from harness.models import tiny_model
from harness.pack import load_pack
from harness.portraits import canvas_with_portraits
from harness.references import faceless_photo

PACK = load_pack()
nodes = PACK.nodes
errors = PACK.pva.errors
regions = PACK.pva.faces.regions


def run(node, **inputs) -> tuple:
    return node.execute(**inputs).result


def as_image(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).float().div(255)[None]


@pytest.fixture(scope="module")
def two_people() -> torch.Tensor:
    """A 768x512 photo: the astronaut (left, smaller face) and another woman (right)."""
    return as_image(canvas_with_portraits(512, 768, [("astronaut", 20, 100, 300), ("veil", 380, 60, 380)]))


@pytest.fixture(scope="module")
def faceless() -> torch.Tensor:
    return as_image(faceless_photo(256))


DETECT = dict(detection_threshold=0.9, min_face_size=20, select_faces="all", if_no_face="error")
REGION_SWITCHES = dict(
    whole_face=False, lower_face=False, eyes_and_brows=False, eyes=False, nose=False, mouth=False
)


def detect(image, **settings):
    return run(nodes.faces.PVADetectFaces, image=image, **{**DETECT, "order": "left to right", **settings})


def region_mask(faces, regions_on=("whole_face",), **settings):
    switches = {**REGION_SWITCHES, **{name: True for name in regions_on}}
    defaults = dict(select_faces="all", masks="one per photo", precision=0.0, grow=0, feather=0)
    (mask,) = run(nodes.faces.PVAFaceRegionMask, faces=faces, **{**defaults, **settings}, **switches)
    return mask


def test_detect_numbers_faces_in_the_chosen_order_and_selects(two_people):
    faces, preview = detect(two_people)
    left, right = faces.photos[0].faces
    assert left.center[0] < 384 < right.center[0]
    largest_first = detect(two_people, order="largest")[0].photos[0].faces[0]
    assert largest_first == right
    selected, _ = detect(two_people, select_faces="1")
    assert selected.photos[0].faces == (right,)
    # the preview is the photo with the faces drawn on it: changed on the boxes, not elsewhere
    assert preview.shape == two_people.shape
    changed = (preview - two_people).abs().amax(-1)[0] > 2 / 255
    x1, y1, x2, _ = (round(v) for v in left.box)
    assert changed[y1 - 2 : y1 + 3, x1 + 5 : x2 - 5].any(0).float().mean() > 0.9  # the top edge of a box
    assert changed[:, :10].sum() == 0 and changed[-10:].sum() == 0  # far from any face


def test_a_photo_without_a_face_fails_or_passes_through(two_people, faceless):
    with pytest.raises(
        errors.NoFaceFoundError, match=r"photo 1 of 1: no face found .*set if_no_face to skip"
    ):
        detect(faceless)
    faces, preview = detect(faceless, if_no_face="skip")
    assert faces.count == 0 and len(faces.photos) == 1
    assert (preview - faceless).abs().max() > 0.5  # says "no face found" on the picture
    assert region_mask(faces).abs().max() == 0
    assert region_mask(faces, masks="one per face").shape == (1, 256, 256)  # not an empty batch
    # an index that a photo with faces does not have is an error in both modes
    for mode in ("error", "skip"):
        with pytest.raises(errors.PVAError, match=r"photo 1 of 1: face index 2 asked for, but only 2 face"):
            detect(two_people, select_faces="2", if_no_face=mode)


def test_region_mask_unites_the_chosen_regions_of_the_chosen_faces(two_people):
    faces, _ = detect(two_people)
    height, width = two_people.shape[1:3]
    left, right = faces.photos[0].faces
    eyes_and_mouth = region_mask(faces, ("eyes", "mouth"))
    expected = torch.zeros(height, width)
    for face in (left, right):
        for region in ("eyes", "mouth"):
            expected = torch.maximum(expected, regions.region_mask(face, region, height, width))
    assert eyes_and_mouth.shape == (1, height, width)
    assert torch.equal(eyes_and_mouth[0], expected)
    only_right = region_mask(faces, select_faces="1")
    assert only_right[0, :, :384].max() == 0 and only_right[0, :, 384:].sum() > 1000
    per_face = region_mask(faces, masks="one per face", grow=4, feather=3)
    assert per_face.shape == (2, height, width)
    assert per_face[0, :, 384:].max() == 0 and per_face[1, :, :384].max() == 0
    with pytest.raises(errors.PVAError, match="region: choose at least one"):
        region_mask(faces, ())
    with pytest.raises(errors.PVAError, match="face index 5 asked for"):
        region_mask(faces, select_faces="5")


def test_crop_takes_the_models_resolution_and_paste_restores_the_photo(two_people):
    faces, _ = detect(two_people)
    crop = nodes.crops.PVACropFaces
    settings = dict(image=two_people, faces=faces, context=2.0, min_face_size=0, small_faces="upscale")
    with pytest.raises(errors.PVAError, match="resolution: 0 means the MODEL's native resolution"):
        run(crop, resolution=0, **settings)
    crops, masks, crop_faces, info = run(crop, resolution=0, model=tiny_model("sd20v"), **settings)
    assert crops.shape == (2, 768, 768, 3) and masks.shape == (2, 768, 768)
    assert crop_faces.count == 2 and info.resolution == 768
    crops, masks, crop_faces, info = run(crop, resolution=512, **settings)
    assert crops.shape == (2, 512, 512, 3)
    assert all(c.square.side <= 512 for c in info.crops)  # enlarged: the round trip is exact
    (restored,) = run(nodes.crops.PVAPasteFaces, image=two_people, crops=crops, crop_info=info, feather=8)
    assert (restored - two_people).abs().max() <= 1 / 255
    # a lower-face mask made on the crops' own faces, as the blend mask
    lower = region_mask(crop_faces, ("lower_face",), masks="one per face")
    white = torch.ones_like(crops)
    (pasted,) = run(
        nodes.crops.PVAPasteFaces, image=two_people, crops=white, crop_info=info, feather=0, mask=lower
    )
    changed = (pasted - two_people).abs().amax(-1)[0] > 1 / 255
    left, right = faces.photos[0].faces
    for face in (left, right):
        eyes_y = (face.landmarks[0][1] + face.landmarks[1][1]) / 2
        mouth_y = (face.landmarks[3][1] + face.landmarks[4][1]) / 2
        x1, x2 = round(face.box[0]), round(face.box[2])
        assert changed[round(mouth_y), x1:x2].any()
        assert not changed[round(eyes_y) - 3, x1:x2].any()  # the lower face only
