"""Generating the pictures of one identity: for each method, every target in every mask type
(and, for CLIP score, every edit prompt on the whole face), skipping what the cache has."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.preprocess import PersonFaces
from ..errors import PVAError
from ..faces.detection import Faces, PhotoFaces
from ..faces.embeddings import embed_photos
from ..files import write_json_atomically
from ..host.inpainting import TextEncoder, inpaint
from ..method.patching import apply_identity
from ..method.weights import load_pva, save_pva
from ..training.data import prepare_personalization_data
from ..training.personalize import TrainingSettings, personalize
from .cache import RunFolder, job_seed
from .plan import IdentityPlan, Target, load_target, locator_for
from .settings import EvaluationSettings

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import VAE

    from ..faces.facenet import FaceNet
    from ..method.model import PVAModel

EDIT_MASK = "wholeface"  # the research code edits with the whole-face mask


@dataclass
class EvaluationModels:
    """What is evaluated: an inpainting MODEL, its VAE and text encoder, the PVA model and the
    FaceNet it reads (both needed only by the PVA methods)."""

    model: ModelPatcher
    vae: VAE
    encode_text: TextEncoder
    pva: PVAModel | None = None
    facenet: FaceNet | torch.nn.Module | None = None
    description: dict = field(default_factory=dict)  # files and names, for the report


@dataclass(frozen=True)
class Job:
    method: str
    target: Target
    mask_type: str
    variant: str  # the mask type, or the edit for CLIP score
    prompt: str
    scope: str  # which CFG branch sees the identity
    path: Path


@dataclass
class References:
    """One person's reference photos, their faces and FaceNet embeddings."""

    photos: list[torch.Tensor]
    faces: Faces
    embeddings: torch.Tensor


def references_from_cache(
    person: PersonFaces | None, plan: IdentityPlan, photos: list[torch.Tensor]
) -> References | None:
    """The references' faces and embeddings from the dataset's face cache (what preprocessing
    found and FaceNet made of them), when it holds every one of them."""
    if person is None:
        return None
    index = {key: i for i, key in enumerate(person.keys)}
    if any(p.key not in index for p in plan.references):
        return None
    chosen = [index[p.key] for p in plan.references]
    faces = Faces(
        tuple(
            PhotoFaces(int(photo.shape[0]), int(photo.shape[1]), (person.faces[i],))
            for photo, i in zip(photos, chosen, strict=True)
        )
    )
    return References(photos, faces, person.embeddings[chosen])


class Generator:
    def __init__(
        self,
        models: EvaluationModels,
        settings: EvaluationSettings,
        folder: RunFolder,
        faces: dict[str, PersonFaces] | None = None,
    ):
        self.models, self.settings, self.folder, self.faces = models, settings, folder, faces
        self.locator = locator_for(settings)
        self._conditioning: dict[str, list] = {}
        if any(m != "no-pva" for m in settings.methods) and (models.pva is None or models.facenet is None):
            raise PVAError(
                "evaluation: the zero-shot and personalized methods need a PVA model and FaceNet weights."
            )

    def conditioning(self, prompt: str) -> list:
        if prompt not in self._conditioning:
            self._conditioning[prompt] = self.models.encode_text(prompt)
        return self._conditioning[prompt]

    def edit_prompt(self, edit: str) -> str:
        return f"{self.settings.prompt}, {edit}"

    # -- one identity ---------------------------------------------------------------------------
    def run(self, plan: IdentityPlan) -> list[str]:
        """Generate what is missing for one identity; returns notes (skipped targets)."""
        targets, notes = [], []
        for photo in plan.targets:
            target = load_target(plan.name, photo, self.settings, self.locator)
            if target is None:
                notes.append(f"{plan.name}/{photo.key}: no face found for its region masks; skipped")
            else:
                targets.append(target)
        for target in targets:
            self._save_inputs(plan.name, target)
        todo = [job for job in self.jobs(plan.name, targets) if not job.path.is_file()]
        references = self.references(plan) if any(job.method != "no-pva" for job in todo) else None
        models: dict[tuple[str, str], ModelPatcher] = {}
        for job in todo:
            key = (job.method, job.scope)
            if key not in models:
                models[key] = self.method_model(job.method, job.scope, plan.name, references)
            result = inpaint(
                models[key],
                self.models.vae,
                self.conditioning(job.prompt),
                self.conditioning(self.settings.negative_prompt),
                job.target.pixels,
                job.target.masks[job.mask_type],
                seed=job_seed(self.settings.seed, plan.name, job.target.photo.key, job.variant),
                steps=self.settings.steps,
                cfg=self.settings.cfg,
                sampler=self.settings.sampler,
                scheduler=self.settings.scheduler,
                paste_back=self.settings.paste_back,
            )
            self.folder.save_picture(job.path, result)
        record = {"targets": [t.photo.key for t in targets], "skipped": notes}
        write_json_atomically(self.folder.person_record(plan.name), record)
        return notes

    def _save_inputs(self, person: str, target: Target) -> None:
        """The ground truth and masks as used, so scoring and the grid need not redo them."""
        path = self.folder.ground_truth(person, target.photo.key)
        if not path.is_file():
            self.folder.save_picture(path, target.pixels)
        for mask_type, mask in target.masks.items():
            path = self.folder.mask(person, target.photo.key, mask_type)
            if not path.is_file():
                self.folder.save_picture(path, mask[..., None].expand(-1, -1, 3))

    def jobs(self, person: str, targets: list[Target]) -> list[Job]:
        settings, jobs = self.settings, []
        for method in settings.methods:
            for target in targets:
                for mask_type in settings.mask_types:
                    path = self.folder.picture("generations", method, person, target.photo.key, mask_type)
                    # identity on the cond branch only: CFG pushes towards it (research code)
                    jobs.append(Job(method, target, mask_type, mask_type, settings.prompt, "positive", path))
                if settings.edits and EDIT_MASK not in target.masks:
                    raise PVAError(
                        f"edits: CLIP score inpaints the whole face; add the {EDIT_MASK!r} mask type."
                    )
                for edit in settings.edits:
                    path = self.folder.picture("edits", method, person, target.photo.key, edit)
                    # with an edit prompt the identity is on both branches, so CFG pushes towards
                    # the edit, not away from the person (research code)
                    jobs.append(Job(method, target, EDIT_MASK, edit, self.edit_prompt(edit), "both", path))
        return jobs

    # -- the methods --------------------------------------------------------------------------
    def references(self, plan: IdentityPlan) -> References:
        photos = [p.read("reference photo") for p in plan.references]
        cached = references_from_cache((self.faces or {}).get(plan.name), plan, photos)
        if cached is not None:
            return cached
        located = self.locator.locate(photos, what="reference photos")
        for photo, face in zip(plan.references, located, strict=True):
            if face is None:
                raise PVAError(
                    f"reference photo {photo.path}: no face found ({self.locator.describe()}). Remove it, lower "
                    "the detection threshold, or use --faces aligned for aligned face photos."
                )
        faces = Faces(
            tuple(
                PhotoFaces(int(p.shape[0]), int(p.shape[1]), (f,))
                for p, f in zip(photos, located, strict=True)
            )
        )
        embeddings = embed_photos(photos, self.models.facenet, faces=faces).embeddings
        return References(photos, faces, embeddings)

    def method_model(
        self, method: str, scope: str, person: str, references: References | None
    ) -> ModelPatcher:
        if method == "no-pva":
            return self.models.model
        pva = self.models.pva if method == "zero-shot" else self.personalized(person, references)
        tokens = pva.encode(references.embeddings)
        return apply_identity(self.models.model, pva, tokens, strength=self.settings.strength, scope=scope)

    def personalized(self, person: str, references: References) -> PVAModel:
        """The PVA model after quick personalization on the person's references (cached)."""
        path = self.folder.personalized(person)
        if path.is_file():
            return load_pva(path)
        settings = self.settings
        started = time.perf_counter()
        with torch.inference_mode(False):
            data = prepare_personalization_data(
                references.photos, self.models.facenet, resolution=settings.resolution, faces=references.faces
            )
        result = personalize(
            self.models.model,
            self.models.vae,
            self.conditioning(settings.prompt),
            data,
            self.models.pva,
            TrainingSettings(
                steps=settings.personalization_steps,
                learning_rate=settings.personalization_learning_rate,
                time_bins=settings.personalization_time_bins,
                seed=job_seed(settings.seed, person, "personalize"),
            ),
        )
        seconds = time.perf_counter() - started
        # the record first: a run stopped in between trains again and rewrites both
        write_json_atomically(
            self.folder.personalization_record(person),
            {"seconds": seconds, "final_loss": result.losses[-1], "references": data.count},
        )
        save_pva(result.pva, path, overwrite=True)
        return result.pva


def personalization_seconds(folder: RunFolder, people: list[str]) -> list[float]:
    seconds = []
    for person in people:
        path = folder.personalization_record(person)
        if path.is_file():
            seconds.append(float(json.loads(path.read_text())["seconds"]))
    return seconds
