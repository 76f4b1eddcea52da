"""CLIP score from a local HuggingFace CLIP folder (a tiny random CLIP of the real architecture
with CLIP's real tokenizer files): the cosine of each image with its own prompt, as computed
independently from the model's towers and projections; nothing downloaded; bad folders named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness.tiny_models import tiny_clip

from pva.errors import PVAError, PVAWeightsError
from pva.measure.clip_score import ClipScorer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def independent_scores(folder, images, prompts) -> torch.Tensor:
    """Towers and projections by hand: resize + centre crop (32 px, square inputs), CLIP's
    normalization, the text's end-of-text token."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.stack(
        [
            F.interpolate(i.permute(2, 0, 1)[None], size=(32, 32), mode="bicubic", antialias=True)[0]
            for i in images
        ]
    )
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=(pixels - mean) / std).pooler_output)
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def test_clip_score_is_the_cosine_of_each_image_with_its_prompt(clip_folder):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(64, 64, 3, generator=generator) for _ in range(3)]
    prompts = ["photo of a person, smiling", "photo of a person, with a beard", "photo of a person, angry"]
    scorer = ClipScorer(clip_folder)
    scores = scorer.scores(images, prompts)
    expected = independent_scores(clip_folder, images, prompts)
    print("\nCLIP scores:", scores.tolist(), "independent:", expected.tolist())
    assert torch.allclose(scores, expected, atol=2e-3), (scores, expected)
    assert scores.abs().max() <= 1
    # each image is scored with its own prompt: another pairing gives other numbers
    swapped = scorer.scores(images, prompts[1:] + prompts[:1])
    assert not torch.allclose(swapped, scores, atol=1e-3)


def test_clip_bad_input(tmp_path, clip_folder):
    with pytest.raises(PVAWeightsError, match="no config.json"):
        ClipScorer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PVAWeightsError, match="cannot be loaded"):
        ClipScorer(tmp_path)
    scorer = ClipScorer(clip_folder)
    with pytest.raises(PVAError, match="2 images but 1 prompts"):
        scorer.scores([torch.rand(8, 8, 3)] * 2, ["a"])
