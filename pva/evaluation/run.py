"""The evaluation entry point: generate every picture of a test split (identities shared among
the launched processes), then measure and report on the main process.

    from pva.evaluation import EvaluationModels, EvaluationSettings, MetricTools, evaluate
    report = evaluate("data/celebahq", models, "runs/eval", EvaluationSettings(), tools)

`models` holds in-memory objects (a ModelPatcher, a VAE, a text encoder, a PVAModel, FaceNet);
`load_models` makes them from files, as scripts/evaluate does."""

from __future__ import annotations

import logging
import os
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.datasets import FaceDataset, open_dataset
from ..data.preprocess import PersonFaces, facenet_digest, load_faces
from ..errors import PVAError
from ..faces.facenet import load_facenet
from ..host.inpainting import clip_text_encoder
from ..host.launch import comfyui_version, load_checkpoint
from ..measure.recognition.facenet_recognizer import FaceNetRecognizer
from ..method.weights import load_pva
from .cache import RunFolder
from .generate import EvaluationModels, Generator, personalization_seconds
from .plan import locator_for, plan_identities
from .report import protocol_lines, write_grid, write_report
from .scoring import MetricTools, finished_entries, identity_scores, quality_scores, text_scores
from .settings import EvaluationSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("pva.evaluation")


def _file(path: str | os.PathLike) -> str:
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()} ({stat.st_size} bytes, modified {time.ctime(stat.st_mtime)})"


def load_models(
    checkpoint: str | os.PathLike,
    pva: str | os.PathLike | None = None,
    facenet: str | os.PathLike | None = None,
) -> EvaluationModels:
    """The models of an evaluation from files (the checkpoint's own text encoder and VAE)."""
    model, clip, vae = load_checkpoint(checkpoint)
    description = {"checkpoint": _file(checkpoint)}
    loaded_pva = None
    if pva is not None:
        loaded_pva = load_pva(pva)
        description["PVA model"] = f"{_file(pva)}, {loaded_pva.describe()}"
    loaded_facenet = None
    if facenet is not None:
        loaded_facenet = load_facenet(facenet)
        description["FaceNet"] = _file(facenet)
    return EvaluationModels(model, vae, clip_text_encoder(clip), loaded_pva, loaded_facenet, description)


def evaluate(
    dataset: FaceDataset | str | os.PathLike,
    models: EvaluationModels,
    out_dir: str | os.PathLike,
    settings: EvaluationSettings | None = None,
    tools: MetricTools | None = None,
    accelerator: Accelerator | None = None,
    faces: dict[str, PersonFaces] | None = None,
) -> dict | None:
    """Run (or resume) an evaluation in `out_dir`; returns the report on the main process
    (None on the others). Each process makes the pictures of every n-th identity. faces: the
    dataset's face cache (cached_faces), whose references need no detection or FaceNet again."""
    settings = settings or EvaluationSettings()
    settings.validate()
    if not isinstance(dataset, FaceDataset):
        dataset = open_dataset(dataset)
    plans = plan_identities(dataset, settings)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    folder = RunFolder(out_dir)
    key = {"settings": settings.generation_key(), "dataset": str(dataset.root), "models": models.description}
    if rank == 0:
        folder.claim(key)
    if accelerator:
        accelerator.wait_for_everyone()
    folder.claim(key)  # the others check they resume the same run

    generator = Generator(models, settings, folder, faces)
    mine = plans[rank::world]
    for i, plan in enumerate(mine):
        started = time.perf_counter()
        generator.run(plan)
        log.info(
            "[rank %d/%d] %d of %d identities: %s (%.1f s)",
            rank,
            world,
            i + 1,
            len(mine),
            plan.name,
            time.perf_counter() - started,
        )
    if accelerator:
        accelerator.wait_for_everyone()
    if rank != 0:
        return None
    return measure(dataset, plans, models, settings, tools, folder)


def measure(
    dataset: FaceDataset,
    plans: list,
    models: EvaluationModels,
    settings: EvaluationSettings,
    tools: MetricTools | None,
    folder: RunFolder,
) -> dict:
    """The numbers and the report files, from a finished run folder."""
    if tools is None:
        tools = MetricTools([FaceNetRecognizer(models.facenet)] if models.facenet is not None else [])
    entries, skipped = finished_entries(folder, plans)
    locator = locator_for(settings)
    identity, per_image = identity_scores(folder, entries, settings, tools, locator)
    notes = list(skipped) + list(tools.notes)
    if not tools.recognizers:
        notes.append("identity similarity not measured: no recognizer given")
    quality = quality_scores(folder, entries, settings, tools) if tools.features is not None else {}
    if tools.features is None:
        notes.append("FID / KID not measured: no Inception weights given")
    text, clip_per_image = (
        text_scores(folder, entries, settings, tools.clip) if tools.clip and settings.edits else ({}, {})
    )
    if settings.edits and tools.clip is None:
        notes.append("CLIP score not measured: no CLIP model given")
    seconds = personalization_seconds(folder, [p.name for p in plans])
    device = _device()
    finetune = (
        {"personalized": f"{statistics.fmean(seconds):.0f} s per identity ({device})"} if seconds else {}
    )
    report = {
        "settings": settings.to_json(),
        "dataset": dataset.describe(),
        "identities": len(plans),
        "targets": len(entries),
        "headline_recognizer": tools.headline.name if tools.headline else None,
        "identity": identity,
        "quality": quality,
        "text": text,
        "features": tools.features_name,
        "clip": tools.clip.name if tools.clip else None,
        "finetune_time": finetune,
        "personalization_seconds": seconds,
        "face_location": locator.describe(),
        "dataset_masks": any(p.masks for plan in plans for p in plan.targets),
        "models": models.description,
        "software": _versions(device),
        "notes": notes,
        "per_image": [
            {"person": person, "photo": photo, "method": method, "variant": variant, "identity": scores}
            for (person, photo, method, variant), scores in sorted(per_image.items())
        ]
        + [
            {"person": person, "photo": photo, "method": method, "variant": edit, "clip": value}
            for (person, photo, method, edit), value in sorted(clip_per_image.items())
        ],
    }
    report["protocol"] = protocol_lines(report)
    report["grid"] = write_grid(
        folder.root / "grid.png", folder, {p.name: p for p in plans}, entries, report["settings"]
    )
    write_report(folder, report)
    return report


def cached_faces(
    cache_dir: str | os.PathLike,
    dataset: FaceDataset,
    facenet: str | os.PathLike,
    settings: EvaluationSettings,
) -> dict[str, PersonFaces]:
    """The dataset's face cache (scripts/preprocess_faces.py) for the evaluation's people, checked
    to be made by the evaluation's own FaceNet file."""
    if settings.faces != "detect":
        raise PVAError(
            f"--face-cache: the cache holds MTCNN's faces; it cannot stand in for --faces {settings.faces}."
        )
    faces = load_faces(cache_dir, [p.name for p in dataset.split(settings.split)])
    wanted = facenet_digest(facenet)
    other = [p for p in faces.values() if p.facenet != wanted]
    if other:
        made_by = other[0].facenet[:12] or "an older version of the pack (no FaceNet recorded)"
        raise PVAError(
            f"--face-cache {cache_dir}: {len(other)} people were embedded by another FaceNet ({made_by}, e.g. "
            f"{other[0].path}) than --facenet {facenet}; give the cache made with this FaceNet, or none."
        )
    return faces


def _device() -> str:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _versions(device: str) -> dict:
    versions = {"torch": torch.__version__, "device": device}
    for name in ("comfyui-pva", "comfyui-frontend-package"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        versions["comfyui"] = comfyui_version()
    except ImportError:
        pass
    return versions
