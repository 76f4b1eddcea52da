"""A small loss-curve picture for the graph (PIL only; ComfyUI ships no plotting library)."""

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, PAD = 512, 256, 32


def loss_curve_image(losses: list[float]) -> torch.Tensor:
    """An IMAGE [1, H, W, 3] of the loss per step, with first/last/min values written on it."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([PAD, PAD // 2, WIDTH - PAD // 2, HEIGHT - PAD], outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        count = max(len(losses) - 1, 1)
        points = [
            (PAD + i / count * (WIDTH - 1.5 * PAD), HEIGHT - PAD - (v - low) / span * (HEIGHT - 1.5 * PAD))
            for i, v in enumerate(losses)
        ]
        draw.line(points, fill=(200, 40, 40), width=2) if len(points) > 1 else draw.point(points, fill="red")
        draw.text(
            (PAD, HEIGHT - PAD + 6),
            f"step 1: {losses[0]:.4f}   step {len(losses)}: {losses[-1]:.4f}",
            fill="black",
        )
        draw.text((PAD + 4, PAD // 2 + 4), f"max {high:.4f}  min {low:.4f}", fill="gray")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
