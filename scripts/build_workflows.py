#!/usr/bin/env python3
"""Build the pack's shipped ComfyUI workflows from one compact description (this file).

For every workflow described below, writes

- `workflows/<name>.json`: the UI format the ComfyUI web UI saves and loads (version 0.4:
  nodes with positions, sizes, sockets and widget values, links, groups, a Note that says which
  model files to put where). ComfyUI lists these in its template browser (GET
  /api/workflow_templates; it scans a custom node pack's `example_workflows/`, `examples/`,
  `workflow/` and `workflows/` folders, non-recursively, so nothing under `workflows/api/` is
  listed);
- `workflows/api/<name>.json`: the API-format twin (what POST /prompt takes), for scripts and
  for the tests, which run every twin through a real ComfyUI server.

The order of a node's widget values and the types of its sockets are not written by hand: they
come from the node definitions, a projection of ComfyUI's /object_info restricted to the node
types used, saved as `workflows/api/object_info_snapshot.json` (refresh it with
`--refresh-snapshot`, which starts a real ComfyUI server with this pack; the tests check that
the snapshot equals the live server's definitions and that these files equal what this script
generates, so they cannot drift).

Usage:
    python scripts/build_workflows.py                    # (re)write workflows/ from the snapshot
    python scripts/build_workflows.py --check            # exit 1 if any file differs
    python scripts/build_workflows.py --refresh-snapshot # re-read /object_info, then write
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
SNAPSHOT_PATH = API_DIR / "object_info_snapshot.json"

# -- what the frontend does with node definitions (ComfyUI frontend 1.32) ----------------------
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# An INT widget named like this gets a "control after generate" widget even when its definition
# does not ask for one (frontend: useIntWidget, migrateWidgetsValues); its value is saved right
# after the INT's own value.
SEED_NAMES = ("seed", "noise_seed")
# Definition options that decide widgets and their saved values (others, e.g. tooltips and
# folder-dependent combo choices, are left out of the snapshot).
KEPT_OPTIONS = ("default", "min", "max", "step", "control_after_generate", "image_upload", "forceInput")
NOTE_TYPE = "Note"  # a frontend-only node: in the UI file, never in the API twin


# -- the description's vocabulary -------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """Output `slot` of node `node`, as the value of an input."""

    node: int
    slot: int


@dataclass
class Node:
    id: int
    class_type: str
    pos: tuple[int, int]
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> Link or widget value
    size: tuple[int, int] | None = None
    title: str | None = None
    group: str | None = None
    control: str = "fixed"  # value of a seed widget's "control after generate"

    def __getitem__(self, slot: int) -> Link:
        return Link(self.id, slot)


@dataclass
class Workflow:
    name: str
    nodes: list[Node] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)  # title -> colour, in drawing order

    def add(
        self, id: int, class_type: str, pos: tuple[int, int], *, size=None, title=None, group=None, **inputs
    ):
        if any(n.id == id for n in self.nodes):
            raise ValueError(f"{self.name}: node id {id} used twice")
        node = Node(id, class_type, pos, inputs, size, title, group)
        self.nodes.append(node)
        return node

    def note(self, id: int, pos: tuple[int, int], text: str, size=(420, 400)) -> Node:
        return self.add(id, NOTE_TYPE, pos, size=size, title="Read me: model files", text=text)

    def group(self, title: str, color: str) -> str:
        self.groups[title] = color
        return title


# -- what the workflows expect a user to have ---------------------------------------------------
CHECKPOINT = "sd-v1-5-inpainting.ckpt"
FACENET = "20180402-114759-vggface2.pt"
PVA_FOR_CHECKPOINT = "pva_sd15.safetensors"
PERSON = "my_person"
PERSON_TOKEN = "my_person_pva"  # written embedding:my_person_pva in prompts
# pva.training.recipe.FROM_SCRATCH_LEARNING_RATE (tests/fast/nodes/test_workflow_files.py keeps them equal)
FROM_SCRATCH_LEARNING_RATE = 1e-3
REFERENCES = ("pva_reference_1.png", "pva_reference_2.png", "pva_reference_3.png")
TARGET = "pva_target.png"
TARGET_MASK = "pva_target_mask.png"
LARGE_PHOTO = "pva_large_photo.png"
TWO_PEOPLE = "pva_two_people.png"
PERSON_A, PERSON_B = "pva_person_a.png", "pva_person_b.png"
SWAP_TARGET = "pva_swap_target.png"

POSITIVE = "a photo of a person, detailed face, natural skin, sharp focus"
NEGATIVE = "blurry, lowres, deformed face, bad anatomy, watermark, text"
POSITIVE_EDIT = "a photo of a person, smiling, with a beard, detailed face, sharp focus"
POSITIVE_BEARD = "a photo of a person with a beard, detailed face, natural skin, sharp focus"
SAMPLING = {
    "seed": 42,
    "steps": 30,
    "cfg": 7.0,
    "sampler_name": "dpmpp_2m",
    "scheduler": "karras",
    "denoise": 1.0,
}

BLUE, GREEN, PURPLE, BROWN, CYAN = "#3f789e", "#8A8", "#a1309b", "#b58b2a", "#88A"

_CHECKPOINT_AND_FACENET_FILES = f"""\
- Load Checkpoint: a Stable Diffusion inpainting checkpoint in ComfyUI/models/checkpoints/, e.g. \
{CHECKPOINT} (SD1.5-inpainting). Any SD1.x/SD2.x/SDXL checkpoint works; inpainting models give the \
paper's setting.
- Load FaceNet (PVA): {FACENET} (facenet-pytorch's InceptionResnetV1 VGGFace2 weights, or a \
.safetensors conversion) in ComfyUI/models/facenet/. It is never downloaded at run time.
"""
_PVA_FILE = f"""\
- Load PVA Model: a PVA model made for the checkpoint's family, in ComfyUI/models/pva/ (here \
{PVA_FOR_CHECKPOINT}). Make one with the 'pva_quick_personalize_and_inpaint' workflow (Save PVA \
Model); no pretrained PVA weights are published.
"""
_MODEL_FILES = _CHECKPOINT_AND_FACENET_FILES + _PVA_FILE
_COMMON_FILES = (
    _CHECKPOINT_AND_FACENET_FILES
    + f"""\
- Reference photos: 3 to 5 photos of the person, one visible face each ({", ".join(REFERENCES)} in \
ComfyUI/input/, or upload your own; add more with another LoadImage + Batch Images).
- Photo to inpaint: {TARGET} and its mask {TARGET_MASK} (white = repaint, e.g. the whole face) in \
ComfyUI/input/. Instead of a mask file you can paint the mask on the photo in the mask editor \
and connect the photo's MASK output.
"""
)

_INPAINT_NOTE = """\
Only the masked region is sampled (Inpaint Model Conditioning), and Image Composite Masked pastes \
the result into the original photo through the mask, so every pixel outside the mask is the \
original."""


# -- building blocks ---------------------------------------------------------------------------
def references(
    wf: Workflow, first_id: int, x: int, y: int, title: str = "Reference photos (one person)"
) -> Link:
    """LoadImage per reference photo, batched with Batch Images; returns the batch."""
    grp = wf.group(title, GREEN)
    loads = [
        wf.add(
            first_id + i,
            "LoadImage",
            (x + 330 * i, y),
            size=(300, 330),
            group=grp,
            title=f"Reference photo {i + 1}",
            image=name,
        )
        for i, name in enumerate(REFERENCES)
    ]
    batch = loads[0][0]
    for i, load in enumerate(loads[1:]):  # Batch Images takes two images: chain them
        batch = wf.add(
            first_id + len(loads) + i,
            "ImageBatch",
            (x + 330 * (i + 1), y + 390),
            size=(210, 46),
            group=grp,
            image1=batch,
            image2=load[0],
        )[0]
    return batch


def identity(wf: Workflow, first_id: int, x: int, y: int, model: Link, pva: Link, facenet: Link, refs: Link,
             strength: float = 1.0, start: float = 0.0, end: float = 1.0) -> Link:  # fmt: skip
    """Encode Identity -> Apply PVA Identity; returns the patched MODEL."""
    grp = wf.group("Identity (PVA)", PURPLE)
    ident = wf.add(first_id, "PVAEncodeIdentity", (x, y), size=(320, 130), group=grp,
                   facenet=facenet, reference_images=refs, detection_threshold=0.9, face_index=0)  # fmt: skip
    apply = wf.add(first_id + 1, "PVAApply", (x, y + 190), size=(320, 210), group=grp,
                   model=model, pva_model=pva, identity=ident[0], strength=strength, start_percent=start,
                   end_percent=end, apply_to="positive")  # fmt: skip
    return apply[0]


def prompts(
    wf: Workflow,
    first_id: int,
    x: int,
    y: int,
    clip: Link,
    positive: str = POSITIVE,
    person: Link | None = None,
) -> tuple[Link, Link]:
    """Positive and negative CLIPTextEncode; returns both. With `person` (a PVA model with a
    person token) the positive prompt is encoded with its token."""
    grp = wf.group("Prompt", CYAN)
    if person is None:
        pos = wf.add(first_id, "CLIPTextEncode", (x, y), size=(400, 160), group=grp,
                     title="Positive prompt", text=positive, clip=clip)  # fmt: skip
    else:
        pos = wf.add(first_id, "PVAEncodePrompt", (x, y), size=(400, 180), group=grp,
                     title="Positive prompt (with the person token)", clip=clip, pva_model=person, text=positive)  # fmt: skip
    neg = wf.add(first_id + 1, "CLIPTextEncode", (x, y + 210), size=(400, 120), group=grp,
                 title="Negative prompt", text=NEGATIVE, clip=clip)  # fmt: skip
    return pos[0], neg[0]


def sample_and_save(wf: Workflow, first_id: int, x: int, y: int, model: Link, vae: Link,
                    conditioning: tuple[Link, Link], pixels: Link, mask: Link, photo: Link, prefix: str,
                    crop_info: Link | None = None) -> Link:  # fmt: skip
    """InpaintModelConditioning -> KSampler -> VAEDecode -> paste back -> SaveImage. The paste is
    ImageCompositeMasked through the mask, or, for crops (crop_info given), Paste Faces. Returns
    the pasted photo."""
    grp = wf.group("Inpaint and paste back into the photo", BLUE)
    positive, negative = conditioning
    cond = wf.add(first_id, "InpaintModelConditioning", (x, y), size=(300, 140), group=grp,
                  positive=positive, negative=negative, vae=vae, pixels=pixels, mask=mask, noise_mask=True)  # fmt: skip
    sampler = wf.add(first_id + 1, "KSampler", (x, y + 200), size=(300, 262), group=grp,
                     model=model, positive=cond[0], negative=cond[1], latent_image=cond[2], **SAMPLING)  # fmt: skip
    decode = wf.add(
        first_id + 2, "VAEDecode", (x + 340, y), size=(210, 46), group=grp, samples=sampler[0], vae=vae
    )
    if crop_info is None:
        paste = wf.add(first_id + 3, "ImageCompositeMasked", (x + 340, y + 100), size=(250, 146), group=grp,
                       destination=photo, source=decode[0], x=0, y=0, resize_source=False, mask=mask)  # fmt: skip
    else:
        paste = wf.add(first_id + 3, "PVAPasteFaces", (x + 340, y + 100), size=(260, 150), group=grp,
                       image=photo, crops=decode[0], crop_info=crop_info, feather=8, mask=mask)  # fmt: skip
    wf.add(
        first_id + 4,
        "SaveImage",
        (x + 630, y),
        size=(400, 440),
        group=grp,
        images=paste[0],
        filename_prefix=prefix,
    )
    return paste[0]


def inpaint(wf: Workflow, first_id: int, x: int, y: int, model: Link, clip: Link, vae: Link,
            positive: str = POSITIVE, prefix: str = "pva/face_inpainting", person: Link | None = None) -> Link:  # fmt: skip
    """Photo + mask -> prompts -> InpaintModelConditioning -> KSampler -> VAEDecode ->
    ImageCompositeMasked (paste back through the mask) -> SaveImage; returns the pasted photo."""
    photo_grp = wf.group("Photo to inpaint", BROWN)
    photo = wf.add(first_id, "LoadImage", (x, y), size=(300, 330), group=photo_grp, title="Photo to inpaint",
                   image=TARGET)  # fmt: skip
    mask = wf.add(first_id + 1, "LoadImageMask", (x + 330, y), size=(300, 330), group=photo_grp,
                  title="Face mask (white = repaint)", image=TARGET_MASK, channel="red")  # fmt: skip
    conditioning = prompts(wf, first_id + 2, x + 700, y, clip, positive, person)
    return sample_and_save(
        wf, first_id + 4, x + 1170, y, model, vae, conditioning, photo[0], mask[0], photo[0], prefix
    )


def checkpoint_and_facenet(wf: Workflow, x: int, y: int) -> tuple[Node, Node]:
    grp = wf.group("Models", BLUE)
    ckpt = wf.add(2, "CheckpointLoaderSimple", (x, y), size=(380, 98), group=grp, ckpt_name=CHECKPOINT)
    facenet = wf.add(3, "PVAFaceNetLoader", (x, y + 150), size=(380, 58), group=grp, facenet_name=FACENET)
    return ckpt, facenet


REGION_SWITCHES = (
    "whole_face",
    "lower_face",
    "eyes_and_brows",
    "eyes",
    "nose",
    "mouth",
)  # Face Region Mask's switches


def models(wf: Workflow, x: int, y: int) -> tuple[Node, Node, Node]:
    """Checkpoint, FaceNet and PVA model loaders."""
    ckpt, facenet = checkpoint_and_facenet(wf, x, y)
    pva = wf.add(
        4, "PVAModelLoader", (x, y + 260), size=(380, 58), group="Models", pva_name=PVA_FOR_CHECKPOINT
    )
    return ckpt, facenet, pva


def detect(wf: Workflow, id: int, x: int, y: int, image: Link, group: str, order: str = "largest",
           select: str = "all", if_no_face: str = "error") -> Node:  # fmt: skip
    return wf.add(id, "PVADetectFaces", (x, y), size=(320, 200), group=group, image=image, detection_threshold=0.9,
                  min_face_size=20, order=order, select_faces=select, if_no_face=if_no_face)  # fmt: skip


def region_mask(wf: Workflow, id: int, x: int, y: int, faces: Link, group: str, title: str,
                regions: tuple[str, ...] = ("whole_face",), select: str = "all", precision: float = 0.0,
                grow: int = 8) -> Node:  # fmt: skip
    switches = {name: name in regions for name in REGION_SWITCHES}
    return wf.add(id, "PVAFaceRegionMask", (x, y), size=(320, 340), group=group, title=title, faces=faces,
                  **switches, select_faces=select, masks="one per photo", precision=precision, grow=grow,
                  feather=0)  # fmt: skip


# -- the workflows -----------------------------------------------------------------------------
def pva_face_inpainting(name: str = "pva_face_inpainting", positive: str = POSITIVE,
                        strength: float = 1.0, start: float = 0.0, end: float = 1.0, extra_note: str = "") -> Workflow:  # fmt: skip
    """(a) A PVA model file + reference photos -> identity -> Apply PVA -> inpaint the face."""
    wf = Workflow(name)
    wf.note(1, (0, 0), f"""\
PVA identity-preserving face inpainting: the masked face is repainted as the person in the \
reference photos.

Put these files in place, then pick them in the loaders:
{_COMMON_FILES}{_PVA_FILE}
{_INPAINT_NOTE}{extra_note}""")  # fmt: skip
    ckpt, facenet, pva = models(wf, 0, 480)
    refs = references(wf, 5, 460, 40)
    model = identity(wf, 10, 1460, 40, ckpt[0], pva[0], facenet[0], refs, strength, start, end)
    inpaint(wf, 12, 460, 600, model, ckpt[1], ckpt[2], positive=positive, prefix=f"pva/{name}")
    return wf


def pva_face_inpainting_with_prompt() -> Workflow:
    """(b) As (a), with a language prompt that changes attributes, and a gentler identity."""
    extra = """

This variant edits attributes with the prompt ("smiling, with a beard"). Apply PVA Identity's \
strength 0.8 and start_percent 0.1 leave the first part of the schedule (the coarse layout: \
expression, beard) to the prompt and keep the identity for the rest; raise them for a closer \
likeness, lower them for a stronger edit."""
    return pva_face_inpainting("pva_face_inpainting_with_prompt", POSITIVE_EDIT, 0.8, 0.1, 1.0, extra)


def pva_quick_personalize_and_inpaint() -> Workflow:
    """(c) Initialize PVA from the MODEL -> Quick Personalize on the references -> Save PVA
    Model + loss plot, and -> Encode Identity -> Apply -> inpaint."""
    wf = Workflow("pva_quick_personalize_and_inpaint")
    wf.note(1, (0, 0), f"""\
Learn a person in about 40 steps, save them as ComfyUI/models/pva/{PERSON}.safetensors, and \
inpaint a face with them in the same run.

Put these files in place, then pick them in the loaders:
{_COMMON_FILES}
Quick Personalize trains only the PVA parameters (the checkpoint is not changed); the paper uses \
40 steps. On a GPU that takes minutes, on a CPU much longer (lower resolution to 256 there). \
Save PVA Model refuses to replace an existing file unless overwrite is on; afterwards the \
person appears in Load PVA Model (see 'pva_inpaint_with_saved_person'). The loss curve is \
shown in the Preview Image node.

{_INPAINT_NOTE}""")  # fmt: skip
    ckpt, facenet = checkpoint_and_facenet(wf, 0, 480)
    refs = references(wf, 5, 460, 40)
    grp = wf.group("Quick personalization (PVA)", PURPLE)
    init = wf.add(10, "PVAInitializeFromModel", (1460, 40), size=(340, 106), group=grp,
                  model=ckpt[0], num_tokens=10, seed=0)  # fmt: skip
    personal = wf.add(11, "PVAQuickPersonalize", (1460, 210), size=(340, 470), group=grp,
                      model=ckpt[0], vae=ckpt[2], clip=ckpt[1], facenet=facenet[0], reference_images=refs,
                      prompt="a photo of a person", steps=40, learning_rate=1e-4, batch_size=1, time_bins=4,
                      resolution=512, seed=0, train="both", gradient_checkpointing=False, mixed_precision="auto",
                      detection_threshold=0.9, face_index=0, pva_model=init[0], recipe="PVA only",
                      person_token="", class_word="person", token_learning_rate=2e-2)  # fmt: skip
    wf.add(
        12,
        "PVASaveModel",
        (1840, 40),
        size=(320, 106),
        group=grp,
        pva_model=personal[0],
        name=PERSON,
        overwrite=False,
    )
    wf.add(
        13,
        "PreviewImage",
        (1840, 210),
        size=(320, 300),
        group=grp,
        title="Personalization loss",
        images=personal[2],
    )
    model = identity(wf, 14, 2220, 40, ckpt[0], personal[0], facenet[0], refs)
    inpaint(wf, 16, 460, 780, model, ckpt[1], ckpt[2], prefix="pva/pva_quick_personalize_and_inpaint")
    return wf


def pva_personalize_from_scratch() -> Workflow:
    """(c2) Initialize PVA from the MODEL -> Quick Personalize with a person token (the recipe for
    a PVA model that was never pretrained) -> Save PVA Model (+ the token to models/embeddings),
    and -> Encode Identity -> Apply -> inpaint with the token in the prompt."""
    wf = Workflow("pva_personalize_from_scratch")
    word = f"embedding:{PERSON_TOKEN}"
    wf.note(1, (0, 0), f"""\
Learn a person from your own checkpoint alone (no pretrained PVA model), save them, and inpaint a \
face with them in the same run.

Put these files in place, then pick them in the loaders:
{_COMMON_FILES}
A PVA model initialized from the checkpoint has never seen a face, so Quick Personalize uses the \
'PVA + person token' recipe (recipe auto says so in its 'recipe' output): beside the PVA \
parameters it learns a new word for the person, {word}, started from the word 'person'. \
Both prompts name the person with it. Save PVA Model writes ComfyUI/models/pva/{PERSON_TOKEN}.safetensors \
and the token to ComfyUI/models/embeddings/{PERSON_TOKEN}.safetensors, so {word} then works in any \
prompt (CLIPTextEncode too); in this run 'Encode Prompt with Person' reads it from the trained model.

{_INPAINT_NOTE}""")  # fmt: skip
    ckpt, facenet = checkpoint_and_facenet(wf, 0, 480)
    refs = references(wf, 5, 460, 40)
    grp = wf.group("Quick personalization with a person token (PVA)", PURPLE)
    init = wf.add(10, "PVAInitializeFromModel", (1460, 40), size=(340, 106), group=grp,
                  model=ckpt[0], num_tokens=10, seed=0)  # fmt: skip
    personal = wf.add(11, "PVAQuickPersonalize", (1460, 210), size=(340, 560), group=grp,
                      model=ckpt[0], vae=ckpt[2], clip=ckpt[1], facenet=facenet[0], reference_images=refs,
                      prompt=f"a photo of {word} person", steps=40, learning_rate=FROM_SCRATCH_LEARNING_RATE,
                      batch_size=1, time_bins=4,
                      resolution=512, seed=0, train="both", gradient_checkpointing=False, mixed_precision="auto",
                      detection_threshold=0.9, face_index=0, pva_model=init[0], recipe="auto",
                      person_token=PERSON_TOKEN, class_word="person", token_learning_rate=2e-2)  # fmt: skip
    wf.add(12, "PVASaveModel", (1840, 40), size=(320, 106), group=grp, pva_model=personal[0], name=PERSON_TOKEN,
           overwrite=False)  # fmt: skip
    wf.add(13, "PreviewImage", (1840, 210), size=(320, 300), group=grp, title="Personalization loss",
           images=personal[2])  # fmt: skip
    model = identity(wf, 14, 2220, 40, ckpt[0], personal[0], facenet[0], refs)
    inpaint(wf, 16, 460, 880, model, ckpt[1], ckpt[2], positive=f"a photo of {word} person, detailed face, "
            "natural skin, sharp focus", prefix="pva/pva_personalize_from_scratch", person=personal[0])  # fmt: skip
    return wf


def pva_inpaint_with_saved_person() -> Workflow:
    """(d) Load the person saved by (c) -> Encode Identity -> Apply -> inpaint."""
    wf = Workflow("pva_inpaint_with_saved_person")
    wf.note(1, (0, 0), f"""\
Inpaint a face as a person you saved before with Quick Personalize (workflow \
'pva_quick_personalize_and_inpaint').

Put these files in place, then pick them in the loaders:
{_COMMON_FILES}\
- Load PVA Model: the saved person, ComfyUI/models/pva/{PERSON}.safetensors (written by Save PVA \
Model; click R or refresh if it was saved after this page loaded). It must have been made with \
the same checkpoint family.

The sampling settings equal those of the quick-personalize workflow, so with the same inputs \
this gives the same picture without training again.

{_INPAINT_NOTE}""")  # fmt: skip
    ckpt, facenet = checkpoint_and_facenet(wf, 0, 480)
    pva = wf.add(4, "PVAModelLoader", (0, 740), size=(380, 58), group="Models", title="Load saved person",
                 pva_name=f"{PERSON}.safetensors")  # fmt: skip
    refs = references(wf, 5, 460, 40)
    model = identity(wf, 10, 1460, 40, ckpt[0], pva[0], facenet[0], refs)
    inpaint(wf, 12, 460, 600, model, ckpt[1], ckpt[2], prefix="pva/pva_inpaint_with_saved_person")
    return wf


def pva_face_detailer_large_photo() -> Workflow:
    """(e) A large photo with small faces: Detect -> Crop at the model's resolution -> inpaint the
    crops with the identity -> Paste back."""
    wf = Workflow("pva_face_detailer_large_photo")
    wf.note(1, (0, 0), f"""\
Face detailer for large photos: every face is cut out at the checkpoint's native resolution \
(SD1.x 512, SD2.x 512/768, SDXL 1024), inpainted as the person in the reference photos, and \
pasted back with a feathered edge. Small faces in big photos come out sharp instead of blurry; \
every pixel outside the pasted faces stays exactly as it was.

Put these files in place, then pick them in the loaders:
{_MODEL_FILES}\
- Reference photos: 3 to 5 photos of the person ({", ".join(REFERENCES)} in ComfyUI/input/).
- The large photo: {LARGE_PHOTO} in ComfyUI/input/ (any size).

Detect Faces is set to skip photos without a face, so a batch or a queue of photos goes on and \
such photos come out unchanged. Its preview numbers the faces: select_faces picks some (e.g. 0 \
or 0,2). Crop Faces' context sets how much surrounding the model sees (2 = twice the face).""")  # fmt: skip
    ckpt, facenet, pva = models(wf, 0, 480)
    refs = references(wf, 5, 460, 40)
    model = identity(wf, 10, 1460, 40, ckpt[0], pva[0], facenet[0], refs)
    grp = wf.group("Find the faces and crop them", BROWN)
    photo = wf.add(
        12, "LoadImage", (460, 600), size=(300, 330), group=grp, title="Large photo", image=LARGE_PHOTO
    )
    faces = detect(wf, 13, 790, 600, photo[0], grp, if_no_face="skip")
    wf.add(14, "PreviewImage", (790, 860), size=(320, 300), group=grp, title="Faces found", images=faces[1])
    crop = wf.add(15, "PVACropFaces", (1140, 600), size=(320, 230), group=grp, image=photo[0], faces=faces[0],
                  resolution=0, context=2.0, min_face_size=0, small_faces="upscale", model=ckpt[0])  # fmt: skip
    conditioning = prompts(wf, 16, 1500, 600, ckpt[1])
    sample_and_save(wf, 18, 1970, 600, model, ckpt[2], conditioning, crop[0], crop[1], photo[0],
                    "pva/pva_face_detailer_large_photo", crop_info=crop[3])  # fmt: skip
    return wf


def pva_two_people() -> Workflow:
    """(f) Two people in one photo: one identity per face, each confined to its face by a region
    mask, through two chained Apply nodes."""
    wf = Workflow("pva_two_people")
    wf.note(1, (0, 0), f"""\
Two people in one photo, each keeping their own identity: Detect Faces numbers the faces left to \
right, a region mask per face confines each identity (two chained Apply PVA Identity nodes, one \
fused attention call), and both faces are inpainted in one pass.

Put these files in place, then pick them in the loaders:
{_MODEL_FILES}\
- Person A (the left face): {PERSON_A}; person B (the right face): {PERSON_B}, in ComfyUI/input/. \
More photos per person work better: add LoadImage + Batch Images.
- The photo: {TWO_PEOPLE} in ComfyUI/input/.

Swap the persons by swapping the two region masks' select_faces (0 and 1). With more people, add \
an Encode Identity, a region mask and an Apply node per person.""")  # fmt: skip
    ckpt, facenet, pva = models(wf, 0, 480)
    encoded = []
    for i, (name, label, file) in enumerate((("A", "left", PERSON_A), ("B", "right", PERSON_B))):
        grp = wf.group(f"Person {name} ({label} face)", GREEN)
        x = 460 + 690 * i
        ref = wf.add(5 + 2 * i, "LoadImage", (x, 40), size=(300, 330), group=grp,
                     title=f"Person {name}: reference photo", image=file)  # fmt: skip
        encoded.append(wf.add(6 + 2 * i, "PVAEncodeIdentity", (x + 330, 40), size=(320, 130), group=grp,
                              facenet=facenet[0], reference_images=ref[0], detection_threshold=0.9, face_index=0))  # fmt: skip
    grp = wf.group("The photo and its faces", BROWN)
    photo = wf.add(
        9, "LoadImage", (460, 600), size=(300, 330), group=grp, title="Photo of two people", image=TWO_PEOPLE
    )
    faces = detect(wf, 10, 790, 600, photo[0], grp, order="left to right")
    wf.add(11, "PreviewImage", (790, 860), size=(320, 300), group=grp, title="Faces found", images=faces[1])
    grp = wf.group("Face region masks", BROWN)
    masks = [
        region_mask(wf, 12 + i, 1160 + 350 * i, 600, faces[0], grp, title, select=select)
        for i, (title, select) in enumerate(
            (("Face 0 (person A)", "0"), ("Face 1 (person B)", "1"), ("Both faces (repaint)", "all"))
        )
    ]
    grp = wf.group("Two identities (PVA)", PURPLE)
    model = ckpt[0]
    for i, (ident, mask) in enumerate(zip(encoded, masks[:2], strict=True)):
        model = wf.add(15 + i, "PVAApply", (1840 + 350 * i, 40), size=(320, 230), group=grp,
                       title=f"Apply person {'AB'[i]}", model=model, pva_model=pva[0], identity=ident[0],
                       strength=1.0, start_percent=0.0, end_percent=1.0, apply_to="positive", mask=mask[0])[0]  # fmt: skip
    conditioning = prompts(wf, 17, 2250, 600, ckpt[1])
    sample_and_save(wf, 19, 2720, 600, model, ckpt[2], conditioning, photo[0], masks[2][0], photo[0],
                    "pva/pva_two_people")  # fmt: skip
    return wf


def pva_face_swap() -> Workflow:
    """(g) Face swap as inpainting (Face-Adapter): the target's face region is repainted with the
    source person's identity on the positive branch and the target's own on the negative one."""
    wf = Workflow("pva_face_swap")
    wf.note(1, (0, 0), f"""\
Face swap as inpainting (Face-Adapter's recipe): the target photo's face is cut out, its face \
region (precision 0.5: freedom of shape) is repainted with the source person's identity on the \
positive branch of CFG, while the target's own identity sits on the negative branch (apply_to \
negative), so CFG pushes away from the old face. Hair, pose, light and background stay the target's.

Put these files in place, then pick them in the loaders:
{_MODEL_FILES}\
- Source person (the face to put in): {", ".join(REFERENCES)} in ComfyUI/input/.
- Target photo (the face to replace): {SWAP_TARGET} in ComfyUI/input/.

The negative identity needs CFG above 1 to act. Raise the source Apply node's strength for a \
closer likeness; lower the target one's if the result drifts from the photo's look.""")  # fmt: skip
    ckpt, facenet, pva = models(wf, 0, 480)
    refs = references(wf, 5, 460, 40, title="Source person (the face to put in)")
    grp = wf.group("Target photo: its face, cut out", BROWN)
    photo = wf.add(
        14, "LoadImage", (460, 600), size=(300, 330), group=grp, title="Target photo", image=SWAP_TARGET
    )
    faces = detect(wf, 15, 790, 600, photo[0], grp, select="0")
    crop = wf.add(16, "PVACropFaces", (1140, 600), size=(320, 230), group=grp, image=photo[0], faces=faces[0],
                  resolution=0, context=2.0, min_face_size=0, small_faces="upscale", model=ckpt[0])  # fmt: skip
    area = region_mask(
        wf, 17, 1140, 880, crop[2], grp, "Adapting area (the target's face)", precision=0.5, grow=16
    )
    grp = wf.group("Identities: source positive, target negative (PVA)", PURPLE)
    source = wf.add(10, "PVAEncodeIdentity", (1460, 40), size=(320, 130), group=grp, title="Source identity",
                    facenet=facenet[0], reference_images=refs, detection_threshold=0.9, face_index=0)  # fmt: skip
    target = wf.add(12, "PVAEncodeIdentity", (1810, 40), size=(320, 130), group=grp, title="Target identity",
                    facenet=facenet[0], reference_images=crop[0], detection_threshold=0.9, face_index=0,
                    faces=crop[2])  # fmt: skip
    model = wf.add(11, "PVAApply", (1460, 230), size=(320, 230), group=grp, title="Apply source (positive)",
                   model=ckpt[0], pva_model=pva[0], identity=source[0], strength=1.0, start_percent=0.0,
                   end_percent=1.0, apply_to="positive")  # fmt: skip
    model = wf.add(13, "PVAApply", (1810, 230), size=(320, 230), group=grp, title="Apply target (negative)",
                   model=model[0], pva_model=pva[0], identity=target[0], strength=1.0, start_percent=0.0,
                   end_percent=1.0, apply_to="negative")  # fmt: skip
    conditioning = prompts(wf, 18, 1510, 600, ckpt[1])
    sample_and_save(wf, 20, 1980, 600, model[0], ckpt[2], conditioning, crop[0], area[0], photo[0],
                    "pva/pva_face_swap", crop_info=crop[3])  # fmt: skip
    return wf


def pva_lower_face_edit() -> Workflow:
    """(h) Repaint only the lower face, steered by a prompt ("with a beard"), keeping the identity."""
    wf = Workflow("pva_lower_face_edit")
    wf.note(1, (0, 0), f"""\
Edit the lower face with a prompt ("with a beard") and keep the person: Face Region Mask makes \
the lower-face mask (nose, mouth and chin; CelebAHQ-IDI's region) from the detected landmarks, \
so nothing is painted by hand, and only that region is repainted.

Put these files in place, then pick them in the loaders:
{_MODEL_FILES}\
- Reference photos: 3 to 5 photos of the person ({", ".join(REFERENCES)} in ComfyUI/input/).
- Photo to edit: {TARGET} in ComfyUI/input/.

Apply PVA Identity's strength 0.8 and start_percent 0.1 leave the start of the schedule to the \
prompt. Precision 0.3 rounds the mask towards a box, giving the beard room; other regions (eyes, \
mouth, ...) are switches on the mask node.""")  # fmt: skip
    ckpt, facenet, pva = models(wf, 0, 480)
    refs = references(wf, 5, 460, 40)
    model = identity(wf, 10, 1460, 40, ckpt[0], pva[0], facenet[0], refs, strength=0.8, start=0.1)
    grp = wf.group("Photo and its lower-face mask", BROWN)
    photo = wf.add(
        12, "LoadImage", (460, 600), size=(300, 330), group=grp, title="Photo to edit", image=TARGET
    )
    faces = detect(wf, 13, 790, 600, photo[0], grp, select="0")
    mask = region_mask(
        wf, 14, 1140, 600, faces[0], grp, "Lower face", regions=("lower_face",), precision=0.3, grow=4
    )
    conditioning = prompts(wf, 15, 1510, 600, ckpt[1], POSITIVE_BEARD)
    sample_and_save(wf, 17, 1980, 600, model, ckpt[2], conditioning, photo[0], mask[0], photo[0],
                    "pva/pva_lower_face_edit")  # fmt: skip
    return wf


def pva_inpaint_and_measure_identity() -> Workflow:
    """(i) As (a), then Identity Similarity scores the inpainted photo against the references."""
    wf = Workflow("pva_inpaint_and_measure_identity")
    wf.note(1, (0, 0), f"""\
Inpaint a face with PVA, then check "is this still the person?": Identity Similarity (PVA) \
compares the inpainted photo with the reference photos.

Put these files in place, then pick them in the loaders:
{_COMMON_FILES}\
- Load PVA Model: a PVA model made for the checkpoint's family, in ComfyUI/models/pva/ (here \
{PVA_FOR_CHECKPOINT}).
- Identity Similarity uses dlib's face recognizer, independent of PVA (optional package: \
pip install --no-deps dlib-bin==20.0.1.post1 face-recognition-models==0.3.0). Or put an \
ArcFace/CosFace .onnx (e.g. insightface's glintr100.onnx, close to the paper's CosFace R100) in \
ComfyUI/models/face_recognition/ and pick it (needs onnxruntime).

The similarity is the cosine of recognizer features (the paper's ID similarity; its PVA scores \
0.741 with CosFace R100 against the ground truth); the node draws the face box and score on the \
photo, and its summary gives dlib's own same-person verdict.

{_INPAINT_NOTE}""")  # fmt: skip
    ckpt, facenet = checkpoint_and_facenet(wf, 0, 480)
    pva = wf.add(4, "PVAModelLoader", (0, 740), size=(380, 58), group="Models", pva_name=PVA_FOR_CHECKPOINT)
    refs = references(wf, 5, 460, 40)
    model = identity(wf, 10, 1460, 40, ckpt[0], pva[0], facenet[0], refs)
    pasted = inpaint(wf, 12, 460, 600, model, ckpt[1], ckpt[2], prefix="pva/pva_inpaint_and_measure_identity")
    grp = wf.group("Is this still the person?", GREEN)
    wf.add(21, "PVAIdentitySimilarity", (2700, 600), size=(400, 560), group=grp, images=pasted,
           recognizer="dlib", reference_images=refs, faces="detect", detection_threshold=0.9, face_index=0)  # fmt: skip
    return wf


def workflows() -> list[Workflow]:
    return [
        pva_face_inpainting(),
        pva_face_inpainting_with_prompt(),
        pva_quick_personalize_and_inpaint(),
        pva_personalize_from_scratch(),
        pva_inpaint_with_saved_person(),
        pva_face_detailer_large_photo(),
        pva_two_people(),
        pva_face_swap(),
        pva_lower_face_edit(),
        pva_inpaint_and_measure_identity(),
    ]


# -- node definitions: the snapshot --------------------------------------------------------------
def node_spec(info: dict) -> dict:
    """The parts of one /object_info entry that decide sockets, widgets and saved values."""
    inputs = []
    order = info.get("input_order") or {
        s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")
    }
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            raw_type = spec[0] if isinstance(spec, list | tuple) else spec
            options = (
                spec[1]
                if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], dict)
                else {}
            )
            entry = {
                "name": name,
                "type": "COMBO" if isinstance(raw_type, list) else raw_type,
                "optional": section == "optional",
            }
            entry.update({k: options[k] for k in KEPT_OPTIONS if k in options})
            inputs.append(entry)
    outputs = [
        {"name": name, "type": "COMBO" if isinstance(type_, list) else type_, "is_list": bool(is_list)}
        for name, type_, is_list in zip(
            info.get("output_name", info.get("output", [])), info.get("output", []),
            info.get("output_is_list", [False] * len(info.get("output", []))), strict=True,
        )
    ]  # fmt: skip
    return {
        # Newer hosts serve "" for nodes without a display name (ImageCompositeMasked on 0.8+).
        "display_name": info.get("display_name") or info.get("name"),
        "output_node": bool(info.get("output_node")),
        "inputs": inputs,
        "outputs": outputs,
    }


def contract(spec: dict) -> dict:
    """What a saved workflow depends on in a node's spec: sockets, widgets and their saved values.
    The display name is the host's wording (the shipped files carry their own titles)."""
    return {key: value for key, value in spec.items() if key != "display_name"}


def used_node_types(wfs: list[Workflow] | None = None) -> list[str]:
    return sorted({n.class_type for wf in wfs or workflows() for n in wf.nodes if n.class_type != NOTE_TYPE})


def snapshot_from_object_info(
    object_info: dict, node_types: list[str] | None = None, version: str = ""
) -> dict:
    node_types = node_types or used_node_types()
    missing = [t for t in node_types if t not in object_info]
    if missing:
        raise KeyError(f"node types not in /object_info: {missing}")
    return {
        "about": "Node definitions (from ComfyUI's /object_info, restricted to the node types the shipped "
        "workflows use, without tooltips or folder-dependent choices) that scripts/build_workflows.py "
        "takes widget order and socket types from. Regenerate: scripts/build_workflows.py --refresh-snapshot.",
        "comfyui_version": version,
        "node_types": {t: node_spec(object_info[t]) for t in sorted(node_types)},
    }


def load_snapshot(path: Path = SNAPSHOT_PATH) -> dict:
    return json.loads(path.read_text())


def is_widget(spec: dict) -> bool:
    return spec["type"] in WIDGET_TYPES and not spec.get("forceInput")


def has_control_widget(spec: dict) -> bool:
    """Does the frontend add a 'control after generate' widget after this one?"""
    if spec["type"] != "INT" or not is_widget(spec):
        return False
    return bool(spec.get("control_after_generate", spec["name"] in SEED_NAMES))


def has_upload_widget(node_spec: dict) -> bool:
    """The frontend appends an upload button (saved value "image") to image-upload nodes."""
    return any(s.get("image_upload") for s in node_spec["inputs"])


# -- rendering -------------------------------------------------------------------------------------
def _check(wf: Workflow, types: dict) -> None:
    by_id = {n.id: n for n in wf.nodes}
    for node in wf.nodes:
        if node.class_type == NOTE_TYPE:
            continue
        if node.class_type not in types:
            raise KeyError(
                f"{wf.name}: node {node.id} {node.class_type} is not in the snapshot (--refresh-snapshot)"
            )
        spec = types[node.class_type]
        names = {s["name"] for s in spec["inputs"]}
        unknown = set(node.inputs) - names
        if unknown:
            raise KeyError(f"{wf.name}: node {node.id} {node.class_type} has no inputs {sorted(unknown)}")
        for s in spec["inputs"]:
            value = node.inputs.get(s["name"])
            if value is None:
                if not s["optional"]:
                    raise ValueError(
                        f"{wf.name}: node {node.id} {node.class_type}: required input {s['name']!r} not set"
                    )
                continue
            if isinstance(value, Link):
                source = by_id[value.node]
                out_type = types[source.class_type]["outputs"][value.slot]["type"]
                if s["type"] != "*" and out_type != "*" and out_type != s["type"]:
                    raise TypeError(f"{wf.name}: {source.class_type}[{value.slot}] ({out_type}) -> "
                                    f"{node.class_type}.{s['name']} ({s['type']})")  # fmt: skip
            elif not is_widget(s):
                raise TypeError(
                    f"{wf.name}: node {node.id} {node.class_type}.{s['name']} is a socket; connect it"
                )


def _execution_order(wf: Workflow) -> dict[int, int]:
    """LiteGraph's 'order': a topological order (ties by id)."""
    deps = {n.id: {v.node for v in n.inputs.values() if isinstance(v, Link)} for n in wf.nodes}
    order: dict[int, int] = {}
    while len(order) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in order and d <= order.keys())
        if not ready:
            raise ValueError(f"{wf.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
    return order


GROUP_PAD, GROUP_TITLE, NODE_TITLE = 10, 46, 30


def ui_workflow(wf: Workflow, snapshot: dict) -> dict:
    types = snapshot["node_types"]
    _check(wf, types)
    order = _execution_order(wf)
    # Each node's UI input list: sockets first (required, then optional), then one input per
    # widget (as the frontend builds a node); links point at positions in that list.
    slot_of: dict[tuple[int, str], int] = {}
    ui_inputs: dict[int, list[dict]] = {}
    for node in wf.nodes:
        if node.class_type == NOTE_TYPE:
            continue
        specs = types[node.class_type]["inputs"]
        sockets = [s for s in specs if not is_widget(s)]
        widgets = [s for s in specs if is_widget(s)]
        ui_inputs[node.id] = []
        for s in sockets + widgets:
            entry = {"name": s["name"], "type": s["type"]}
            if is_widget(s):
                entry["widget"] = {"name": s["name"]}
            entry["link"] = None
            slot_of[(node.id, s["name"])] = len(ui_inputs[node.id])
            ui_inputs[node.id].append(entry)
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    for node in sorted(wf.nodes, key=lambda n: n.id):
        if node.class_type == NOTE_TYPE:
            continue
        for s in types[node.class_type]["inputs"]:  # definition order: stable link ids
            value = node.inputs.get(s["name"])
            if not isinstance(value, Link):
                continue
            link_id = len(links) + 1
            source_type = next(n for n in wf.nodes if n.id == value.node).class_type
            out_type = types[source_type]["outputs"][value.slot]["type"]
            slot = slot_of[(node.id, s["name"])]
            links.append([link_id, value.node, value.slot, node.id, slot, out_type])
            ui_inputs[node.id][slot]["link"] = link_id
            out_links.setdefault((value.node, value.slot), []).append(link_id)

    nodes = []
    for node in sorted(wf.nodes, key=lambda n: n.id):
        entry: dict[str, Any] = {
            "id": node.id,
            "type": node.class_type,
            "pos": list(node.pos),
            "size": list(node.size or (315, 100)),
            "flags": {},
            "order": order[node.id],
            "mode": 0,
        }
        if node.class_type == NOTE_TYPE:
            entry.update(inputs=[], outputs=[], title=node.title, properties={"text": ""},
                         widgets_values=[node.inputs["text"]], color="#432", bgcolor="#653")  # fmt: skip
            nodes.append(entry)
            continue
        spec = types[node.class_type]
        entry["inputs"] = ui_inputs[node.id]
        entry["outputs"] = [
            {"name": out["name"], "type": out["type"], "links": out_links.get((node.id, i)), "slot_index": i}
            for i, out in enumerate(spec["outputs"])
        ]
        if node.title:
            entry["title"] = node.title
        entry["properties"] = {"Node name for S&R": node.class_type}
        values = []
        for s in spec["inputs"]:
            if not is_widget(s):
                continue
            value = node.inputs.get(s["name"], s.get("default"))
            values.append(None if isinstance(value, Link) else value)
            if has_control_widget(s):
                values.append(node.control)
        if has_upload_widget(spec):
            values.append("image")
        entry["widgets_values"] = values
        nodes.append(entry)

    groups = []
    for title, color in wf.groups.items():
        members = [n for n in wf.nodes if n.group == title]
        if not members:
            continue
        x0 = min(n.pos[0] for n in members) - GROUP_PAD
        y0 = min(n.pos[1] for n in members) - NODE_TITLE - GROUP_TITLE
        x1 = max(n.pos[0] + (n.size or (315, 100))[0] for n in members) + GROUP_PAD
        y1 = max(n.pos[1] + (n.size or (315, 100))[1] for n in members) + GROUP_PAD
        groups.append({"id": len(groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": color, "font_size": 24, "flags": {}})  # fmt: skip
    return {
        "last_node_id": max(n.id for n in wf.nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}},
        "version": 0.4,
    }


def api_workflow(wf: Workflow, snapshot: dict) -> dict:
    """The API-format twin, straight from the description (not from the UI file)."""
    types = snapshot["node_types"]
    _check(wf, types)
    prompt = {}
    for node in sorted(wf.nodes, key=lambda n: n.id):
        if node.class_type == NOTE_TYPE:
            continue
        inputs = {}
        for s in types[node.class_type]["inputs"]:
            if s["name"] not in node.inputs:
                continue
            value = node.inputs[s["name"]]
            inputs[s["name"]] = [str(value.node), value.slot] if isinstance(value, Link) else value
        title = node.title or types[node.class_type]["display_name"]
        prompt[str(node.id)] = {"inputs": inputs, "class_type": node.class_type, "_meta": {"title": title}}
    return prompt


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def render_all(snapshot: dict | None = None) -> dict[str, str]:
    """{path relative to the repository: file text} for every generated file."""
    snapshot = snapshot if snapshot is not None else load_snapshot()
    files = {}
    for wf in workflows():
        files[f"workflows/{wf.name}.json"] = dumps(ui_workflow(wf, snapshot))
        files[f"workflows/api/{wf.name}.json"] = dumps(api_workflow(wf, snapshot))
    return files


def stale_files(files: dict[str, str]) -> list[Path]:
    """JSON files in workflows/ and workflows/api/ that the description no longer makes."""
    keep = {REPO_ROOT / p for p in files} | {SNAPSHOT_PATH}
    return sorted(
        p for d in (WORKFLOWS_DIR, API_DIR) if d.is_dir() for p in d.glob("*.json") if p not in keep
    )


# -- refreshing the snapshot from a real server -------------------------------------------------
def fetch_object_info(url: str | None) -> tuple[dict, str]:
    import urllib.request

    def get(base: str, path: str) -> dict:
        with urllib.request.urlopen(base + path, timeout=60) as response:
            return json.loads(response.read())

    if url:
        return get(url, "/object_info"), get(url, "/system_stats")["system"].get("comfyui_version", "")
    # Start a throwaway ComfyUI (the test harness's) with this pack linked into custom_nodes.
    import tempfile

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from harness.server import ComfyServer, make_base_directory

    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(make_base_directory(Path(tmp), REPO_ROOT)).start()
        try:
            return server.object_info(), server.get_json("/system_stats")["system"].get("comfyui_version", "")
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    parser.add_argument("--refresh-snapshot", action="store_true", help="re-read the node definitions first")
    parser.add_argument("--url", help="with --refresh-snapshot: a running ComfyUI (default: start one)")
    args = parser.parse_args(argv)

    if args.refresh_snapshot:
        object_info, version = fetch_object_info(args.url)
        SNAPSHOT_PATH.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT_PATH.write_text(dumps(snapshot_from_object_info(object_info, version=version)))
        print(f"wrote {SNAPSHOT_PATH.relative_to(REPO_ROOT)}")
    files = render_all()
    differ = [
        p for p, text in files.items() if not (REPO_ROOT / p).is_file() or (REPO_ROOT / p).read_text() != text
    ]
    stale = stale_files(files)
    if args.check:
        for p in differ:
            print(f"out of date: {p}")
        for p in stale:
            print(f"not generated: {p.relative_to(REPO_ROOT)}")
        return 1 if differ or stale else 0
    for p in stale:
        p.unlink()
        print(f"removed {p.relative_to(REPO_ROOT)}")
    for p in differ:
        (REPO_ROOT / p).parent.mkdir(parents=True, exist_ok=True)
        (REPO_ROOT / p).write_text(files[p])
        print(f"wrote {p}")
    print(f"{len(files)} files up to date" if not differ else f"{len(differ)} of {len(files)} files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
