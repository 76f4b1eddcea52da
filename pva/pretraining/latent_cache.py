"""Cached VAE latents of the pretraining targets: each photo cropped, masked and encoded once.

Without it, every sample decodes its photo, crops it and runs the VAE twice (ComfyUI's
InpaintModelConditioning encodes the crop and the crop with its mask painted grey): on the CPU at
128 px that made a pretraining step 1.48x a bare UNet step. Like kohya's --cache_latents, the
latents are made once. What stays random per sample is the choice among a fixed number of
*views* of each photo (a crop context drawn per view) and of *masks* per view (a dataset mask or
a facial region at a random SmartBrush precision, drawn as the per-step path draws them). The
per-step path (PretrainingConfig.latents = "per-step") keeps a fresh crop and mask per sample,
for augmentations that need pixels.

One file per person, beside the face cache:
    <latents dir>/<fingerprint>/<person>.safetensors
        latents  [P, V, C, h, w] float16     each view's crop: the training target
        masked   [P, V, M, C, h, w] float16  the crop with mask m painted grey (inpainting models)
        masks    [P, V, M, S*S/8] uint8      mask m, S x S pixels, one bit each
    header: the fingerprint, the faces it was made from, and a checksum of every
    (photo, view, mask) unit. A unit whose checksum fails is never trained on: its sample is made
    from the photo instead, and the file is set aside (.damaged) for the next start to make again.
The fingerprint covers the VAE's weights, the resolution, the views and masks, the crop and mask
settings and the seed: changing any of them gives another folder, never a mix. A finished
folder holds complete.json, so a start-up need not open every person's file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open

from ..data.preprocess import PersonFaces
from ..files import make_writable_folder, save_safetensors, write_atomically, write_json_atomically
from ..host.conditioning import masked_for_inpainting
from .samples import CachedTarget, PretrainingSamples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from comfy.sd import VAE

FORMAT = "comfyui-pva-latents"
FORMAT_VERSION = 1
COMPLETE = "complete.json"


def vae_digest(vae: VAE) -> str:
    """sha256 of the VAE's weights (which VAE made a cache's latents)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.first_stage_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def faces_digest(person: PersonFaces) -> str:
    """What a person's entry was made from: their photos and detected faces."""
    made_from = [
        [k, list(f.box), [list(p) for p in f.landmarks]]
        for k, f in zip(person.keys, person.faces, strict=True)
    ]
    return hashlib.sha256(json.dumps(made_from).encode()).hexdigest()[:24]


def _checksum(*parts: torch.Tensor) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """The cached latents of one configuration: where they are and how to read one unit.
    Plain data, so data-loader workers get a copy."""

    def __init__(
        self, root: Path, fingerprint: str, views: int, masks: int, resolution: int, inpainting: bool
    ):
        self.folder = Path(root) / fingerprint
        self.fingerprint, self.views, self.masks = fingerprint, views, masks
        self.resolution, self.inpainting = resolution, inpainting
        self._noted: set[str] = set()

    @classmethod
    def for_run(
        cls, root: Path, vae: VAE, samples: PretrainingSamples, views: int, masks: int, inpainting: bool
    ) -> LatentCache:
        settings = asdict(samples.settings)
        shaping = {k: settings[k] for k in ("resolution", "context", "regions", "dataset_mask_probability")}
        made_with = dict(shaping, views=views, masks=masks, inpainting=inpainting, seed=samples.seed,
                         vae=vae_digest(vae), format=FORMAT_VERSION)  # fmt: skip
        fingerprint = hashlib.sha256(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:16]
        return cls(root, fingerprint, views, masks, shaping["resolution"], inpainting)

    def path(self, person: str) -> Path:
        return self.folder / f"{person}.safetensors"

    def is_current(self, person: PersonFaces) -> bool:
        """Whether the person's file is there, readable and made from these faces (its header only)."""
        try:
            with safe_open(str(self.path(person.name)), framework="pt") as f:
                header = f.metadata() or {}
        except Exception:  # missing, truncated, not a safetensors file: made again
            return False
        return (
            header.get("format") == FORMAT
            and header.get("fingerprint") == self.fingerprint
            and header.get("faces") == faces_digest(person)
        )

    def read(self, person: str, photo: int, view: int, mask: int) -> CachedTarget | None:
        """One unit, checked against its checksum; None (and the file set aside) when the file is
        missing or the unit damaged."""
        path = self.path(person)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                latent = f.get_slice("latents")[photo : photo + 1, view : view + 1][0, 0]
                masked = (
                    f.get_slice("masked")[photo : photo + 1, view : view + 1, mask : mask + 1][0, 0, 0]
                    if self.inpainting
                    else None
                )
                bits = f.get_slice("masks")[photo : photo + 1, view : view + 1, mask : mask + 1][0, 0, 0]
            expected = json.loads(header["checksums"])[photo][view][mask]
        except FileNotFoundError:
            return None
        except Exception as error:  # safetensors' errors, a damaged header, a unit out of range
            self._set_aside(path, f"cannot be read ({error})")
            return None
        parts = (latent, bits) if masked is None else (latent, masked, bits)
        if _checksum(*parts) != expected:
            self._set_aside(path, f"photo {photo}, view {view}, mask {mask} fails its checksum")
            return None
        side = self.resolution
        pixels = np.unpackbits(bits.numpy())[: side * side].reshape(side, side)
        return CachedTarget(
            latent.float(), None if masked is None else masked.float(), torch.from_numpy(pixels).float()
        )

    def _set_aside(self, path: Path, problem: str) -> None:
        try:
            os.replace(path, path.with_suffix(".damaged"))
        except FileNotFoundError:  # another process or worker set it aside first
            pass
        (self.folder / COMPLETE).unlink(missing_ok=True)  # the next start looks for what is missing
        if path.name not in self._noted:
            self._noted.add(path.name)
            print(f"[PVA pretraining] cached latents {path}: {problem}; this person's samples are made from "
                  "their photos until the next start makes the file again.", flush=True)  # fmt: skip

    def complete_marker(self, people: Sequence[PersonFaces]) -> dict:
        """Which face-cache files a complete folder was made from: their names, sizes and times
        (one stat each, no file opened: a start-up at 100k people does not read 100k files)."""
        digest = hashlib.sha256()
        for person in people:
            stat = os.stat(person.path)
            digest.update(f"{person.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return {"people": len(people), "made_from": digest.hexdigest()}

    def is_complete(self, people: Sequence[PersonFaces]) -> bool:
        marker = self.folder / COMPLETE
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return found == self.complete_marker(people)


@torch.no_grad()
def encode_person(cache: LatentCache, samples: PretrainingSamples, person: PersonFaces, vae: VAE) -> dict:
    """Every view and mask of every photo of the person, encoded: the file's tensors. (Two VAE
    calls per person: ComfyUI's VAE.encode costs a model-management pass per call.)"""
    crops, masks = [], []
    for index in range(len(person)):
        pixels = samples.photos[person.keys[index]].read()  # decoded once for all its views
        for crop, view_masks in (
            samples.view(person, index, pixels, v, cache.masks) for v in range(cache.views)
        ):
            crops.append(crop)
            masks.append(view_masks)
    crops, masks = torch.stack(crops), torch.stack(masks)  # [P*V, S, S, 3], [P*V, M, S, S]
    photos, views = len(person), cache.views
    latents = vae.encode(crops).to("cpu", torch.float16)
    tensors = {"latents": latents.unflatten(0, (photos, views))}
    if cache.inpainting:
        grey = masked_for_inpainting(crops.repeat_interleave(cache.masks, dim=0), masks.flatten(0, 1))
        masked = vae.encode(grey).to("cpu", torch.float16)
        tensors["masked"] = masked.unflatten(0, (photos, views, cache.masks))
    packed = np.packbits(masks.flatten(2).round().to(torch.uint8).numpy(), axis=-1)
    tensors["masks"] = torch.from_numpy(packed).unflatten(0, (photos, views))
    return tensors


def write_person(cache: LatentCache, person: PersonFaces, tensors: dict) -> None:
    checksums = [
        [
            [
                _checksum(
                    tensors["latents"][p, v],
                    *((tensors["masked"][p, v, m],) if cache.inpainting else ()),
                    tensors["masks"][p, v, m],
                )
                for m in range(cache.masks)
            ]
            for v in range(cache.views)
        ]
        for p in range(len(person))
    ]
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": cache.fingerprint,
              "person": person.name, "faces": faces_digest(person), "checksums": json.dumps(checksums)}  # fmt: skip
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(cache.path(person.name), lambda temp: save_safetensors(contiguous, temp, header))


def build_latent_cache(
    cache: LatentCache,
    samples: PretrainingSamples,
    vae: VAE,
    accelerator: Accelerator,
) -> int:
    """Make the entries of `samples.people` that are missing, damaged or made from other faces,
    split among the processes; returns how many this process made. A folder marked complete is
    trusted without opening its files (a damaged unit is still caught by its checksum)."""
    people = [samples.faces[name] for name in samples.people]
    if cache.is_complete(people):
        return 0
    # every process checks (one failing alone would leave the others waiting for it)
    make_writable_folder(cache.folder, "latents_dir (--latents-dir; default <face cache>/latents)")
    made = 0
    mine = people[accelerator.process_index :: accelerator.num_processes]
    for person in mine:
        if cache.is_current(person):
            continue
        write_person(cache, person, encode_person(cache, samples, person, vae))
        cache.path(person.name).with_suffix(".damaged").unlink(missing_ok=True)
        made += 1
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomically(cache.folder / COMPLETE, cache.complete_marker(people))
    accelerator.wait_for_everyone()
    return made
