"""CLIP score: how well a result follows an edit prompt ("smiling", "with a beard"), as the
cosine similarity of CLIP's image and text embeddings (the research code reports the plain
cosine with OpenAI's ViT-B/32; torchmetrics' "CLIPScore" is 100 x max(cosine, 0)).

The model is a HuggingFace CLIP folder the user gives (config.json, weights, tokenizer and
preprocessor files, e.g. a local copy of openai/clip-vit-base-patch32); it is read with
local_files_only, so nothing is downloaded unless the user allows it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PVAError, PVAWeightsError
from ..optional import require

CLIP_HINT = (
    "give a local HuggingFace CLIP folder (config.json, model.safetensors or pytorch_model.bin, tokenizer "
    "and preprocessor_config.json), e.g. a copy of openai/clip-vit-base-patch32"
)


class ClipScorer:
    def __init__(
        self, folder: str | os.PathLike, device: str | torch.device = "cpu", allow_download: bool = False
    ):
        """`folder`: a local CLIP folder; with `allow_download` also a hub name such as
        openai/clip-vit-base-patch32 (transformers' own download and cache)."""
        transformers = require("transformers")
        folder = Path(folder)
        if not allow_download and not (folder / "config.json").is_file():
            raise PVAWeightsError(f"CLIP model {folder}: no config.json there; {CLIP_HINT}.")
        local = not allow_download
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=local)
            self.processor = transformers.CLIPProcessor.from_pretrained(str(folder), local_files_only=local)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PVAWeightsError(
                f"CLIP model {folder} cannot be loaded ({first[:300]}); {CLIP_HINT}."
            ) from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.name = folder.name

    @torch.no_grad()
    def scores(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        """[N] cosine similarity of each [H,W,3] 0..1 image with its prompt."""
        if len(images) != len(prompts):
            raise PVAError(f"CLIP score: {len(images)} images but {len(prompts)} prompts.")
        if not images:
            raise PVAError("CLIP score: no images to score.")
        inputs = self.processor(
            text=list(prompts),
            images=[image.clamp(0, 1).cpu().numpy() for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            do_rescale=False,  # the images are already 0..1
        )
        output = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image, text = (
            F.normalize(output.image_embeds.float(), dim=-1),
            F.normalize(output.text_embeds.float(), dim=-1),
        )
        return (image * text).sum(-1).cpu()
