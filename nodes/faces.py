"""Faces in photos: find them (FACES), and masks of their regions."""

import torch
from comfy_api.latest import io

from ..pva.faces.detection import ORDERS, DetectionSettings, find_faces, parse_selection, require_faces
from ..pva.faces.preview import preview_faces
from ..pva.faces.regions import REGIONS, face_masks
from .types import CATEGORY, FacesType, detection_threshold_input

IF_NO_FACE = ("error", "skip")
MASK_LAYOUTS = ("one per photo", "one per face")
# REGIONS as widget names: one on/off switch per region, so several can be chosen at once
REGION_INPUTS = {region: region.replace(" ", "_") for region in REGIONS}

_SELECT_TOOLTIP = (
    "Which faces: all, an index (0 = the first in the order), a list such as 0,2 or a range such as 0-2."
)


class PVADetectFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVADetectFaces",
            display_name="Detect Faces (PVA)",
            category=CATEGORY,
            description="Finds every face in each photo (MTCNN, retried at other scales, turned and "
            "contrast-stretched before giving up) with its box and 5 landmarks. FACES holds the selected "
            "faces in the chosen order; the preview numbers every face found (selected ones in colour).",
            inputs=[
                io.Image.Input("image", tooltip="The photos (a batch). Any size."),
                detection_threshold_input(),
                io.Int.Input(
                    "min_face_size",
                    default=20,
                    min=1,
                    max=8192,
                    tooltip="Faces smaller than this many pixels (the box's longer side) are ignored.",
                ),
                io.Combo.Input(
                    "order",
                    options=list(ORDERS),
                    default="largest",
                    tooltip="How faces are numbered: largest first, left to right, or top to bottom.",
                ),
                io.String.Input(
                    "select_faces",
                    default="all",
                    tooltip=_SELECT_TOOLTIP + " Later nodes number the selected faces from 0 again.",
                ),
                io.Combo.Input(
                    "if_no_face",
                    options=list(IF_NO_FACE),
                    default="error",
                    tooltip="error: stop with a message naming the photo. skip: pass that photo on without "
                    "faces: masks leave it empty, crop and paste return it unchanged, the queue goes on.",
                ),
            ],
            outputs=[FacesType.Output(display_name="FACES"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(
        cls, image, detection_threshold, min_face_size, order, select_faces, if_no_face
    ) -> io.NodeOutput:
        selection = parse_selection(select_faces)
        settings = DetectionSettings(threshold=detection_threshold, min_face_size=min_face_size, order=order)
        found = find_faces(image, settings, what="image")
        require_faces(
            found,
            selection,
            "photo",
            detection_threshold,
            faceless_ok=if_no_face == "skip",
            hint=", or set if_no_face to skip to pass such photos on unchanged",
        )
        return io.NodeOutput(found.select(selection), preview_faces(image, found, selection))


class PVAFaceRegionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        switches = [
            io.Boolean.Input(
                name, default=region == "whole face", tooltip=f"Include the {region} (any number of regions)."
            )
            for region, name in REGION_INPUTS.items()
        ]
        return io.Schema(
            node_id="PVAFaceRegionMask",
            display_name="Face Region Mask (PVA)",
            category=CATEGORY,
            description="Masks of facial regions (CelebAHQ-IDI's: whole face, lower face, eyes and brows; plus "
            "eyes, nose, mouth) from detected faces, at the photo's size. Precision 0 follows the region's "
            "shape; towards 1 it grows to the region's bounding box, leaving the model freedom of shape.",
            inputs=[
                FacesType.Input(
                    "faces", tooltip="From 'Detect Faces (PVA)' (or 'Crop Faces (PVA)' for crops)."
                ),
                *switches,
                io.String.Input("select_faces", default="all", tooltip=_SELECT_TOOLTIP),
                io.Combo.Input(
                    "masks",
                    options=list(MASK_LAYOUTS),
                    default="one per photo",
                    tooltip="one per photo: the union of its selected faces' regions. one per face: a mask "
                    "for every face, photo by photo in order (no face in any photo: one empty mask per photo).",
                ),
                io.Float.Input(
                    "precision",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="0 = the region's exact shape, 1 = its bounding box (SmartBrush's mask precision).",
                ),
                io.Int.Input(
                    "grow",
                    default=0,
                    min=-512,
                    max=512,
                    tooltip="Grow (or shrink, negative) by this many pixels.",
                ),
                io.Int.Input(
                    "feather", default=0, min=0, max=512, tooltip="Soften the edge over this many pixels."
                ),
            ],
            outputs=[io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def execute(cls, faces, select_faces, masks, precision, grow, feather, **switches) -> io.NodeOutput:
        regions = [region for region, name in REGION_INPUTS.items() if switches[name]]
        selection = parse_selection(select_faces)
        require_faces(faces, selection, "photo", faceless_ok=True)
        chosen = faces.select(selection)
        mask = face_masks(chosen, regions, precision, grow, feather, per_face=masks == "one per face")
        if mask.shape[0] == 0:  # no face in any photo (skipped upstream): pass the photos through
            mask = torch.zeros(len(faces.photos), *mask.shape[1:])
        return io.NodeOutput(mask)
