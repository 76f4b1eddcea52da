"""The sampler's schedules and names."""

from __future__ import annotations

import torch


def karras_sigmas(model_sampling, steps: int) -> torch.Tensor:  # noqa: ANN001
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model_sampling, "karras", steps)


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
