"""Pretraining with a Flux base: the same run, loss and file as with a UNet, on ComfyUI's own Flux
Fill class at a tiny width (random weights) and the synthetic people."""

from __future__ import annotations

import pytest
import torch
from harness.models import flux_inputs, run_dit, tiny_flux, tiny_vae
from harness.pretraining import pretraining_run, tiny_text_encoder

pytestmark = [pytest.mark.training, pytest.mark.test_models("synthetic-people")]


def test_pretraining_on_a_flux_fill_base_trains_the_blocks_projections(tmp_path):
    """Four steps on a tiny Flux Fill base: every double-stream block's W' and the encoder move
    away from their initial values, the losses are finite, and the exported file is a Flux Fill
    PVA model (format 3) that patches the base."""
    from harness.pretraining import synthetic_world

    from pva.method.model import PVAModel
    from pva.method.patching import apply_identity
    from pva.method.weights import load_pva, read_metadata
    from pva.pretraining.session import Base

    world = synthetic_world()
    model = tiny_flux("flux-fill")
    base = Base(
        model, tiny_vae(latent_channels=16), tiny_text_encoder(32, pooled_dim=32), "tiny-flux-fill", "tiny"
    )
    start = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    result = pretraining_run(
        world, tmp_path / "run", base=base, max_steps=4, batch_size=2, learning_rate=1e-3
    )()
    trained = result.pva
    assert trained.family == "FluxInpaint" and trained.layers == start.layers
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    for spec in start.layers:
        for name in ("to_q", "to_k", "to_v"):
            before = getattr(start.projections_for(spec.name), name).weight
            after = getattr(trained.projections_for(spec.name), name).weight
            assert (after - before).abs().max() > 1e-5, (spec.name, name)
    saved = sorted((tmp_path / "run").rglob("pva.safetensors"))[-1]
    assert read_metadata(saved)["format_version"] == "3"
    loaded = load_pva(saved)
    tokens = loaded.encode(torch.nn.functional.normalize(torch.randn(2, 512), dim=-1))
    inputs = flux_inputs(model, batch=1)
    assert (
        run_dit(apply_identity(model, loaded, tokens), inputs) - run_dit(model, inputs)
    ).abs().max() > 1e-4
