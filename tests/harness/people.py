"""Two synthetic "people" for personalization tests: distinct face colours and identities."""

import torch

from pva.training.data import PersonalizationData


def synthetic_person(
    hue: tuple[float, float, float], seed: int, count: int = 3, resolution: int = 64
) -> PersonalizationData:
    """`count` photos of one person: a textured face of colour `hue` in an elliptic whole-face
    mask on a shared grey background, and FaceNet-like embeddings clustered around a
    person-specific direction (as real embeddings of one person are)."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij"
    )
    masks, pixels = [], []
    for i in range(count):
        shift = 0.08 * (i - count // 2)
        mask = (((xs - shift) / 0.55) ** 2 + (ys / 0.7) ** 2 <= 1).float()
        texture = 0.15 * torch.sin(xs * (6 + i) * 3.14) * torch.cos(ys * 5 * 3.14)
        face = (torch.tensor(hue).view(1, 1, 3) + texture.unsqueeze(-1)).clamp(0, 1)
        background = torch.full((resolution, resolution, 3), 0.5) + 0.05 * torch.randn(
            resolution, resolution, 3, generator=generator
        )
        pixels.append(torch.where(mask.unsqueeze(-1) > 0, face, background).clamp(0, 1))
        masks.append(mask)
    centre = torch.randn(512, generator=generator)
    embeddings = torch.nn.functional.normalize(
        centre + 0.3 * torch.randn(count, 512, generator=generator), dim=-1
    )
    flipped = torch.nn.functional.normalize(
        embeddings + 0.05 * torch.randn(count, 512, generator=generator), dim=-1
    )
    return PersonalizationData(torch.stack(pixels), torch.stack(masks), embeddings, flipped)
