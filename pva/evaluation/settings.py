"""What an evaluation run does: methods, mask types, sampler, personalization, prompts.

Everything that decides the generated images is part of `generation_key()`: a stopped run
resumes from its cache only with the same key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..data.datasets import IDI_MASK_REGIONS, IDI_MASK_TYPES, SPLITS
from ..errors import PVAError
from ..measure.recognition import FACE_MODES

METHODS = ("no-pva", "zero-shot", "personalized")
METHOD_LABELS = {
    "no-pva": "no PVA (base inpainting model)",
    "zero-shot": "PVA zero-shot (references encoded, no training)",
    "personalized": "PVA personalized",
}
# CelebAHQ-IDI's mask types in the research code's order, and their labels in reports.
MASK_LABELS = {
    "lowerface": "lower face",
    "eyebrow": "eyes/brows",
    "wholeface": "whole face",
    "random": "random",
}
DEFAULT_MASK_TYPES = ("lowerface", "eyebrow", "wholeface")
# The research code's 15 edit prompts for CLIP score ("photo of a person, <edit>").
RESEARCH_EDITS = (
    "laughing", "serious", "smiling", "looking sad", "angry", "surprised", "has beard",
    "with heavy makeup", "wearing lipstick", "making a funny face", "putting the tongue out",
    "singing with a microphone", "smoking, has a cigarette", "wearing eyeglasses", "wearing sunglasses",
)  # fmt: skip


@dataclass(frozen=True)
class EvaluationSettings:
    methods: tuple[str, ...] = METHODS
    mask_types: tuple[str, ...] = DEFAULT_MASK_TYPES
    split: str = "test"
    references: int = 5  # reference photos per identity (the paper's IDI-5)
    limit_people: int = 0  # 0: every identity of the split
    faces: str = "detect"  # "aligned": fixed face crop of aligned photos (CelebA-HQ), no detector
    detection_threshold: float = 0.9
    mask_precision: float = 1.0  # region masks when the dataset has none: 1 = box (as CelebAHQ-IDI's)
    resolution: int = 512  # targets are centre-cropped to a square and resized to this
    prompt: str = "photo of a person"
    negative_prompt: str = ""
    edits: tuple[str, ...] = ()  # CLIP score: inpaint the whole face with "<prompt>, <edit>"
    seed: int = 0
    steps: int = 100
    cfg: float = 6.0
    # the research code samples DDIM with eta 1 (100 steps): ancestral steps on DDIM's schedule
    sampler: str = "euler_ancestral"
    scheduler: str = "ddim_uniform"
    strength: float = 1.0
    paste_back: bool = True  # the result outside the mask is the photo itself (as the workflows do)
    personalization_steps: int = 40
    personalization_learning_rate: float = 1e-4
    personalization_time_bins: int = 4
    grid_rows: int = 8

    def validate(self) -> None:
        from ..host.sampling import sampler_names, scheduler_names

        checks = [
            (self.methods and set(self.methods) <= set(METHODS), f"methods: choose from {METHODS}, got {self.methods}."),
            (
                self.mask_types and set(self.mask_types) <= set(IDI_MASK_TYPES),
                f"mask types: choose from {IDI_MASK_TYPES}, got {self.mask_types}.",
            ),
            (self.split in (*SPLITS, "all"), f"split: one of {(*SPLITS, 'all')}, got {self.split!r}."),
            (self.references >= 1, f"references: at least 1, got {self.references}."),
            (self.faces in FACE_MODES, f"faces: one of {FACE_MODES}, got {self.faces!r}."),
            (0 < self.detection_threshold < 1, f"detection threshold: between 0 and 1, got {self.detection_threshold}."),
            (0 <= self.mask_precision <= 1, f"mask precision: between 0 and 1, got {self.mask_precision}."),
            (self.resolution >= 64 and self.resolution % 64 == 0, f"resolution: a multiple of 64, got {self.resolution}."),
            (self.steps >= 1, f"steps: at least 1, got {self.steps}."),
            (self.sampler in sampler_names(), f"sampler: {self.sampler!r} is not a ComfyUI sampler."),
            (self.scheduler in scheduler_names(), f"scheduler: {self.scheduler!r} is not a ComfyUI scheduler."),
            (self.strength >= 0, f"strength: must be >= 0, got {self.strength}."),
            (self.personalization_steps >= 1, f"personalization steps: at least 1, got {self.personalization_steps}."),
            (self.limit_people >= 0, f"limit people: 0 (all) or more, got {self.limit_people}."),
            (len(set(self.edits)) == len(self.edits), f"edits: listed twice in {self.edits}."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise PVAError(message)

    def generation_key(self) -> dict:
        """The settings the generated images depend on (not those of metrics or the report)."""
        return {k: v for k, v in self.to_json().items() if k not in ("grid_rows",)}

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> EvaluationSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def region_of(mask_type: str) -> str | None:
    """The pack's facial region for a CelebAHQ-IDI mask type (None: random masks have none)."""
    return IDI_MASK_REGIONS.get(mask_type)
