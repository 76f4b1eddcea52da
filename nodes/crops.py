"""Crop faces out of photos at the model's resolution, and paste them back: any sampler graph
fits between the two nodes (Impact Pack's SEGS style)."""

from comfy_api.latest import io

from ..pva.errors import PVAError
from ..pva.faces.crops import SMALL_FACES, crop_faces, paste_faces
from ..pva.method.layers import native_resolution
from .types import CATEGORY, FaceCropsType, FacesType


class PVACropFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVACropFaces",
            display_name="Crop Faces (PVA)",
            category=CATEGORY,
            description="Cuts each face out of its photo with some surroundings, resized to the MODEL's native "
            "resolution, so a small face in a large photo is inpainted at full detail. Inpaint the crops "
            "with any sampler graph, then put them back with 'Paste Faces (PVA)'.",
            inputs=[
                io.Image.Input("image", tooltip="The photos the faces were found in."),
                FacesType.Input("faces", tooltip="From 'Detect Faces (PVA)' on the same image: every face in it is cropped."),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="Side of the crops in pixels. 0 = the MODEL's native resolution (SD1.x 512, SD2.x "
                    "512 or 768 for v-prediction, SDXL 1024).",
                ),
                io.Float.Input(
                    "context",
                    default=2.0,
                    min=1.0,
                    max=16.0,
                    step=0.1,
                    tooltip="The crop's side is this many times the face's size (Impact Pack's crop_factor); "
                    "2 is what quick personalization trains on.",
                ),
                io.Int.Input(
                    "min_face_size",
                    default=0,
                    min=0,
                    max=8192,
                    tooltip="Faces smaller than this many pixels are handled as small_faces says.",
                ),
                io.Combo.Input(
                    "small_faces",
                    options=list(SMALL_FACES),
                    default="upscale",
                    tooltip="upscale: crop and enlarge them like the others; skip: leave them as they are.",
                ),
                io.Model.Input(
                    "model", optional=True, tooltip="The MODEL the crops are for (sets resolution 0)."
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Photo-sized mask(s) to crop with the faces (one, one per photo or one per face, "
                    "e.g. from 'Face Region Mask (PVA)'); without it each crop's mask is its whole face.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="crops"),
                io.Mask.Output(display_name="masks"),
                FacesType.Output(display_name="crop_faces"),
                FaceCropsType.Output(display_name="crop_info"),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, image, faces, resolution, context, min_face_size, small_faces, model=None, mask=None
    ) -> io.NodeOutput:
        if resolution == 0:
            if model is None:
                raise PVAError(
                    "resolution: 0 means the MODEL's native resolution; connect the MODEL, or set it."
                )
            resolution = native_resolution(model)
        crops, info = crop_faces(image, faces, resolution, context, min_face_size, small_faces, mask)
        return io.NodeOutput(crops, info.masks, info.faces(), info)


class PVAPasteFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAPasteFaces",
            display_name="Paste Faces (PVA)",
            category=CATEGORY,
            description="Puts the (inpainted) crops from 'Crop Faces (PVA)' back into their photos through "
            "their masks, with a feathered edge. Every pixel the masks do not reach is the input's, "
            "bit for bit.",
            inputs=[
                io.Image.Input("image", tooltip="The photos that went into 'Crop Faces (PVA)'."),
                io.Image.Input("crops", tooltip="The crops after inpainting, in the order they were cut."),
                FaceCropsType.Input("crop_info", tooltip="From the same 'Crop Faces (PVA)'."),
                io.Int.Input(
                    "feather",
                    default=8,
                    min=0,
                    max=256,
                    tooltip="Soften the blend at the mask's edge over this many crop pixels.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Crop-sized blend mask(s), one or one per crop (e.g. the region you inpainted); "
                    "without it, the masks the crops were cut with.",
                ),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, image, crops, crop_info, feather, mask=None) -> io.NodeOutput:
        return io.NodeOutput(paste_faces(image, crops, crop_info, mask, feather))
