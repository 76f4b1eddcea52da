"""The numbers of an evaluation, from the run folder: identity similarity per recognizer, FID
and KID against the ground truth, CLIP score on the edit prompts. Pictures are read in chunks,
so a full test split never sits in memory at once."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PVAError
from ..measure.clip_score import ClipScorer
from ..measure.image_metrics import FeatureExtractor, fid, image_features, kid
from ..measure.recognition import FaceLocator, Recognizer, cosine, locate_and_embed
from .cache import RunFolder
from .plan import IdentityPlan
from .settings import EvaluationSettings

CHUNK = 32


@dataclass(frozen=True)
class Entry:
    """One target of one person as the run folder holds it."""

    person: str
    key: str


@dataclass
class MetricTools:
    """The instruments: recognizers (the first independent one is the headline), an image
    feature network for FID/KID (None: not measured) and a CLIP model (None: no CLIP score)."""

    recognizers: list[Recognizer]
    features: FeatureExtractor | None = None
    clip: ClipScorer | None = None
    features_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> Recognizer | None:
        independent = [r for r in self.recognizers if r.independent]
        return (independent or self.recognizers or [None])[0]


def finished_entries(folder: RunFolder, plans: Sequence[IdentityPlan]) -> tuple[list[Entry], list[str]]:
    entries, skipped = [], []
    for plan in plans:
        path = folder.person_record(plan.name)
        if not path.is_file():
            raise PVAError(
                f"evaluation: the pictures of {plan.name} are not all made yet ({path} is missing); "
                "run the evaluation again with the same output folder to finish them (it resumes)."
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        entries += [Entry(plan.name, key) for key in record["targets"]]
        skipped += record["skipped"]
    if not entries:
        raise PVAError(
            "evaluation: no result to measure; every target was skipped (no face found for its region masks): "
            + "; ".join(skipped[:3])
        )
    return entries, skipped


def _chunks(paths: Sequence[Path]) -> Iterator[list[torch.Tensor]]:
    for start in range(0, len(paths), CHUNK):
        yield [RunFolder.load_picture(p) for p in paths[start : start + CHUNK]]


def _summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None,
        "n": len(values),
    }


def _embed_all(recognizer: Recognizer, paths: Sequence[Path], locator: FaceLocator, what: str) -> list:
    features = []
    for images in _chunks(paths):
        features += locate_and_embed(recognizer, images, locator, what).features
    return features


def identity_scores(
    folder: RunFolder,
    entries: list[Entry],
    settings: EvaluationSettings,
    tools: MetricTools,
    locator: FaceLocator,
) -> tuple[dict, dict]:
    """Per recognizer, method and mask type: cosine similarity of result and ground truth. A
    result whose face is not found scores 0 (counted as missed); a ground truth whose face is
    not found leaves the target out for that recognizer."""
    table, per_image = {}, {}
    truths = [folder.ground_truth(e.person, e.key) for e in entries]
    for recognizer in tools.recognizers:
        truth = _embed_all(recognizer, truths, locator, "ground-truth photos")
        methods = {}
        for method in settings.methods:
            row = {}
            for mask_type in settings.mask_types:
                results = [folder.picture("generations", method, e.person, e.key, mask_type) for e in entries]
                found = _embed_all(recognizer, results, locator, "results")
                values, missed = [], 0
                for entry, gt, result in zip(entries, truth, found, strict=True):
                    if gt is None:
                        continue
                    value = 0.0 if result is None else float(cosine(result, gt[None])[0])
                    missed += result is None
                    values.append(value)
                    per_image.setdefault((entry.person, entry.key, method, mask_type), {})[
                        recognizer.name
                    ] = None if result is None else value
                row[mask_type] = dict(_summary(values), missed=missed)
            means = [row[m]["mean"] for m in settings.mask_types if row[m]["mean"] is not None]
            row["mean"] = statistics.fmean(means) if means else None
            methods[method] = row
        table[recognizer.name] = {
            "label": recognizer.label,
            "independent": recognizer.independent,
            "ground_truth_without_face": sum(gt is None for gt in truth),
            "methods": methods,
        }
    return table, per_image


def _features(paths: Sequence[Path], extractor: FeatureExtractor) -> torch.Tensor:
    return torch.cat([image_features(images, extractor) for images in _chunks(paths)])


def quality_scores(
    folder: RunFolder, entries: list[Entry], settings: EvaluationSettings, tools: MetricTools
) -> dict:
    """FID and KID (x 1000) of each method's results against the ground-truth photos, per mask
    type, and their mean over mask types (the research code reports them per mask type)."""
    real = _features([folder.ground_truth(e.person, e.key) for e in entries], tools.features)
    table = {}
    for method in settings.methods:
        row = {}
        for mask_type in settings.mask_types:
            paths = [folder.picture("generations", method, e.person, e.key, mask_type) for e in entries]
            fake = _features(paths, tools.features)
            if len(entries) < 2:
                row[mask_type] = {
                    "fid": None,
                    "kid": None,
                    "n": len(entries),
                    "note": "needs at least 2 images",
                }
                continue
            kid_mean, kid_std = kid(real, fake, seed=settings.seed)
            row[mask_type] = {
                "fid": fid(real, fake),
                "kid": kid_mean * 1000,
                "kid_std": kid_std * 1000,
                "n": len(entries),
            }
        for metric in ("fid", "kid"):
            values = [row[m][metric] for m in settings.mask_types if row[m][metric] is not None]
            row[f"mean_{metric}"] = statistics.fmean(values) if values else None
        table[method] = row
    return table


def text_scores(
    folder: RunFolder, entries: list[Entry], settings: EvaluationSettings, clip: ClipScorer
) -> tuple[dict, dict]:
    """Per method and edit: mean CLIP cosine of the edited result with "<prompt>, <edit>"."""
    table, per_image = {}, {}
    for method in settings.methods:
        row = {}
        for edit in settings.edits:
            prompt = f"{settings.prompt}, {edit}"
            paths = [folder.picture("edits", method, e.person, e.key, edit) for e in entries]
            values = []
            for images in _chunks(paths):
                values += clip.scores(images, [prompt] * len(images)).tolist()
            for entry, value in zip(entries, values, strict=True):
                per_image[(entry.person, entry.key, method, edit)] = value
            row[edit] = _summary(values)
        row["mean"] = statistics.fmean(row[e]["mean"] for e in settings.edits) if settings.edits else None
        table[method] = row
    return table, per_image
