"""Small local models of the real architectures for the evaluation's instruments: a CLIP
(transformers' CLIPModel with ComfyUI's own copy of CLIP's tokenizer files) and an ArcFace-style
ONNX face recognizer (exported with torch.onnx). Random weights; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .host import comfyui_path


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A HuggingFace CLIP folder (config, safetensors weights, tokenizer, preprocessor) with a
    2-layer text and vision tower, 32 px images and 16-d embeddings."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_path() / "comfy" / "sd1_tokenizer"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_arcface(seed: int = 0) -> torch.nn.Module:
    """[N, 3, 112, 112] -> [N, 32]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
            torch.nn.Flatten(), torch.nn.Linear(16 * 13 * 13, 32),
        ).eval()  # fmt: skip


def export_onnx(net: torch.nn.Module, path: Path) -> Path:
    """An ONNX file with insightface's recognizer interface (one [batch, 3, 112, 112] input)."""
    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (torch.randn(2, 3, 112, 112),), str(path), dynamo=False, input_names=["input.1"],
            output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        )  # fmt: skip
    return path
