"""Pretraining samples, following the research code's recipe.

A sample is one target photo of a person, cropped square around the face, with an inpainting
mask (a facial region from the detected landmarks at a random SmartBrush precision, or one of
the dataset's own masks), 1 to `max_references` *other* photos of the same person as references
(sometimes plus a mirrored one), and a caption (the photo's own half of the time, else a
template).

Every random choice of sample number i comes from a generator seeded with (seed, i): the same
sample whatever the number of processes, data-loader workers or restarts, so a resumed run and
a run split over more processes see exactly the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..data.datasets import FaceDataset, Photo
from ..data.preprocess import PersonFaces
from ..errors import PVAError
from ..faces.crops import crop_face
from ..faces.regions import region_mask

TEMPLATES = (
    "photo of a person",
    "a photo of a person",
    "a close-up photo of a person",
    "a portrait photo of a person",
    "a photo of a face",
)
REGIONS = ("whole face", "lower face", "eyes and brows")  # CelebAHQ-IDI's region masks


@dataclass(frozen=True)
class SampleSettings:
    resolution: int = 512
    max_references: int = 5
    mirror_probability: float = 0.2  # add a mirrored reference
    caption_probability: float = 0.5  # the photo's own caption instead of a template
    dataset_mask_probability: float = 0.5  # use the dataset's mask, when it has one for the target
    identity_dropout: float = 0.05  # no identity for the sample (trains the CFG branch without it)
    context: tuple[float, float] = (1.8, 2.6)  # crop side / face size, drawn per sample
    regions: tuple[str, ...] = REGIONS  # the landmark-region masks to draw from
    with_crops: bool = False  # stage 2: the reference crops, for FaceNet to embed in training

    @property
    def reference_slots(self) -> int:
        return self.max_references + 1  # room for the mirrored one


@dataclass
class References:
    """A sample's reference faces, padded to a fixed number of slots ([B, ...] in a batch)."""

    embeddings: torch.Tensor  # [R, 512] FaceNet embeddings
    mask: torch.Tensor  # [R] bool: which slots hold a face
    crops: torch.Tensor | None = None  # [R, 3, 160, 160] standardized crops (stage 2 embeds them)

    @classmethod
    def stack(cls, items: Sequence[References]) -> References:
        crops = [r.crops for r in items]
        return cls(
            torch.stack([r.embeddings for r in items]),
            torch.stack([r.mask for r in items]),
            None if crops[0] is None else torch.stack(crops),
        )

    def to(self, device: torch.device) -> References:
        return References(
            self.embeddings.to(device),
            self.mask.to(device),
            None if self.crops is None else self.crops.to(device),
        )


@dataclass(frozen=True)
class CachedTarget:
    """A sample's target as a latent cache holds it (latent_cache.py)."""

    latent: torch.Tensor  # [C, h, w] float32: the VAE's latent of the crop
    masked: torch.Tensor | None  # [C, h, w] float32: of the crop with its mask painted grey
    mask: torch.Tensor  # [S, S] float 0/1


class LatentSource(Protocol):
    """What the samples read from a latent cache (latent_cache.LatentCache)."""

    views: int
    masks: int

    def read(self, person: str, photo: int, view: int, mask: int) -> CachedTarget | None: ...


@dataclass
class Sample:
    """One training sample: the photo to inpaint (its crop, or its cached latents), its mask and
    caption, its references."""

    pixels: torch.Tensor | None  # [S, S, 3] the crop around the face, 0..1 (None: latents cached)
    mask: torch.Tensor  # [S, S] 1 = inpaint here
    caption: str
    noise_seed: int  # the sample's noise levels and noise come from it
    person: str
    references: References
    keep: bool = True  # False: the sample sees no identity (identity dropout)
    latents: CachedTarget | None = None  # the VAE's latents of the crop, made beforehand


@dataclass
class SampleBatch:
    pixels: torch.Tensor | None  # [B, S, S, 3]; zeros where a sample's latents are cached; None: all are
    mask: torch.Tensor  # [B, S, S]
    captions: list[str]
    noise_seeds: list[int]
    people: list[str]
    references: References  # [B, R, ...]
    keep: torch.Tensor  # [B] bool
    latents: torch.Tensor | None = None  # [B, C, h, w] the crops' latents (where cached)
    masked: torch.Tensor | None = None  # [B, C, h, w] the masked crops' latents (inpainting models)
    cached: torch.Tensor | None = None  # [B] bool: which samples' latents are given

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> SampleBatch:
        """The data loader's collate function."""
        cached = [s.latents is not None for s in samples]
        pixels = latents = masked = None
        if not all(cached):
            side = samples[0].mask.shape[-1]
            pixels = torch.stack(
                [torch.zeros(side, side, 3) if s.pixels is None else s.pixels for s in samples]
            )
        if any(cached):
            like = next(s.latents for s in samples if s.latents is not None)
            latents = torch.stack(
                [s.latents.latent if s.latents else torch.zeros_like(like.latent) for s in samples]
            )
            if like.masked is not None:
                masked = torch.stack(
                    [s.latents.masked if s.latents else torch.zeros_like(like.masked) for s in samples]
                )
        return cls(
            pixels,
            torch.stack([s.mask for s in samples]),
            [s.caption for s in samples],
            [s.noise_seed for s in samples],
            [s.person for s in samples],
            References.stack([s.references for s in samples]),
            torch.tensor([s.keep for s in samples]),
            latents,
            masked,
            torch.tensor(cached) if any(cached) else None,
        )


class PretrainingSamples(torch.utils.data.Dataset):
    """Sample number i (any integer) of the people's photos."""

    def __init__(
        self,
        dataset: FaceDataset,
        faces: dict[str, PersonFaces],
        people: Sequence[str],
        settings: SampleSettings,
        seed: int = 0,
        latents: LatentSource | None = None,
    ):
        self.people = [p for p in people if p in faces]
        if not self.people:
            raise PVAError(
                "dataset: no person with at least 2 usable photos in this split; preprocessing skipped "
                "them all (see the cache's report.json)."
            )
        self.faces = faces
        self.photos: dict[str, Photo] = {  # these people's only (a dataset may hold a million photos)
            p.key: p for name in self.people for p in dataset.people[name].photos
        }
        self.settings = settings
        self.seed = seed
        self.latents = latents  # None: every sample's crop and mask are drawn afresh

    def __len__(self) -> int:  # sampled by index, never iterated to the end
        return 2**62

    def rng(self, index: int) -> random.Random:
        return random.Random(f"pva-sample:{self.seed}:{index}")  # str seeds are hashed with sha512

    def __getitem__(self, index: int) -> Sample:
        rng = self.rng(index)
        person = self.faces[self.people[rng.randrange(len(self.people))]]
        target = rng.randrange(len(person))
        if self.latents is None:
            pixels, mask, caption, noise_seed = self.target(person, target, rng)
            latents = None
        else:
            pixels, mask, caption, noise_seed, latents = self.cached_target(person, target, rng)
        references = self.references(person, target, rng)
        keep = rng.random() >= self.settings.identity_dropout
        return Sample(pixels, mask, caption, noise_seed, person.name, references, keep, latents)

    def cached_target(
        self, person: PersonFaces, index: int, rng: random.Random
    ) -> tuple[torch.Tensor | None, torch.Tensor, str, int, CachedTarget | None]:
        """The photo to inpaint as one of its cached views and masks: (None, mask, caption, noise
        seed, latents), or, when its cache entry is missing or damaged, the same view and mask made
        from the photo: (crop, mask, caption, noise seed, None)."""
        cache = self.latents
        view, which = rng.randrange(cache.views), rng.randrange(cache.masks)
        photo = self.photos[person.keys[index]]
        caption, noise_seed = self.caption(photo, rng), rng.getrandbits(63)
        cached = cache.read(person.name, index, view, which)
        if cached is not None:
            return None, cached.mask, caption, noise_seed, cached
        crop, masks = self.view(person, index, photo.read(), view, cache.masks)
        return crop, masks[which], caption, noise_seed, None

    def view(
        self, person: PersonFaces, index: int, pixels: torch.Tensor, view: int, masks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """View number `view` of photo `index` (what the latent cache stores): its crop [S, S, 3]
        and `masks` masks [masks, S, S], drawn from a generator of the photo and the view alone."""
        rng = random.Random(f"pva-view:{self.seed}:{person.keys[index]}:{view}")
        crop, drawn = self.crop_and_mask(person, index, pixels, rng, masks=masks)
        return crop, drawn.reshape(masks, *drawn.shape[-2:])

    def target(
        self, person: PersonFaces, index: int, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        """The photo to inpaint: crop, mask, caption and the sample's noise seed."""
        photo = self.photos[person.keys[index]]
        crop, mask = self.crop_and_mask(person, index, photo.read(), rng)
        return crop, mask, self.caption(photo, rng), rng.getrandbits(63)

    def crop_and_mask(
        self, person: PersonFaces, index: int, pixels: torch.Tensor, rng: random.Random, masks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A crop of photo `index` ([S, S, 3], context drawn from `rng`) and `masks` inpainting
        masks for it ([S, S], or [masks, S, S] when masks > 1), each a dataset mask or a facial
        region at a random precision, drawn one after the other from `rng`."""
        settings = self.settings
        photo = self.photos[person.keys[index]]
        context = rng.uniform(*settings.context)
        crop, face = crop_face(pixels, person.faces[index], settings.resolution, context)
        crop = crop.clamp(0, 1)  # (the crop's sharpening may overshoot at hard edges)
        drawn = []
        for _ in range(masks):
            if photo.masks and rng.random() < settings.dataset_mask_probability:
                kind = sorted(photo.masks)[rng.randrange(len(photo.masks))]
                full = photo.read_mask(kind, tuple(pixels.shape[:2]))[..., None].expand(-1, -1, 3)
                cropped, _ = crop_face(full, person.faces[index], settings.resolution, context)
                drawn.append((cropped[..., 0] > 0.5).float())
            else:
                region = settings.regions[rng.randrange(len(settings.regions))]
                side = settings.resolution
                drawn.append(region_mask(face, region, side, side, precision=rng.random()))
        return crop, drawn[0] if masks == 1 else torch.stack(drawn)

    def caption(self, photo: Photo, rng: random.Random) -> str:
        if photo.caption and rng.random() < self.settings.caption_probability:
            return f"photo of a person, {photo.caption}"
        return TEMPLATES[rng.randrange(len(TEMPLATES))]

    def references(self, person: PersonFaces, target: int | None, rng: random.Random) -> References:
        """1..max_references photos of the person other than `target` (padded to a fixed count),
        sometimes plus the mirror image of one of them."""
        settings = self.settings
        others = [i for i in range(len(person)) if i != target]
        chosen = rng.sample(others, rng.randint(1, min(settings.max_references, len(others))))
        stored = person.embeddings  # (read from the face cache when first used)
        embeddings = [stored[i] for i in chosen]
        sources = [(i, False) for i in chosen]
        if rng.random() < settings.mirror_probability:
            mirrored = chosen[rng.randrange(len(chosen))]
            embeddings.append(person.mirrored[mirrored])
            sources.append((mirrored, True))
        slots = settings.reference_slots
        out = References(torch.zeros(slots, 512), torch.zeros(slots, dtype=torch.bool))
        out.embeddings[: len(embeddings)] = torch.stack(embeddings)
        out.mask[: len(embeddings)] = True
        if settings.with_crops:
            crops = person.crops([i for i, _ in sources])
            flips = torch.tensor([flip for _, flip in sources])
            crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
            out.crops = torch.zeros(slots, 3, 160, 160)
            out.crops[: len(sources)] = crops
        return out


class StepSampler(torch.utils.data.Sampler):
    """Sample indices for each micro-batch of this process, from `start_step` on.

    Step s uses samples s*G .. s*G + G - 1 (G = batch x accumulation x processes); micro-batch m
    of process r takes the `batch` of them at offset (m * processes + r) * batch. So the same
    global batch is seen by 1 process accumulating 2 micro-batches and by 2 processes with 1."""

    def __init__(self, start_step: int, steps: int, batch: int, accumulation: int, processes: int, rank: int):
        self.start_step, self.steps = start_step, steps
        self.batch, self.accumulation = batch, accumulation
        self.processes, self.rank = processes, rank

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch * self.accumulation * self.processes
        for step in range(self.start_step, self.steps):
            for micro in range(self.accumulation):
                offset = step * per_step + (micro * self.processes + self.rank) * self.batch
                yield list(range(offset, offset + self.batch))
