"""The PVA weights file: exact round trip, header metadata, and clear errors for bad files."""

import json

import pytest
import torch
from harness.models import run_unet, tiny_model, unet_inputs

from pva.errors import PVAError, PVAWeightsError
from pva.method.model import PVAModel
from pva.method.patching import apply_identity
from pva.method.weights import load_pva, read_metadata, save_pva


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def pva(sd15):
    model = PVAModel.initialize_from(sd15, num_tokens=4, seed=3, encoder_depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_round_trip_is_exact(sd15, pva, tmp_path):
    path = save_pva(pva, tmp_path / "person.safetensors")
    loaded = load_pva(path)
    original_state, loaded_state = pva.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    embeddings = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    inputs = unet_inputs(sd15)
    out_a = run_unet(apply_identity(sd15, pva, pva.encode(embeddings)), inputs)
    out_b = run_unet(apply_identity(sd15, loaded, loaded.encode(embeddings)), inputs)
    assert torch.equal(out_a, out_b)


def test_header_describes_the_model(pva, tmp_path):
    meta = read_metadata(save_pva(pva, tmp_path / "p.safetensors"))
    assert meta["family"] == "SD15" and meta["context_dim"] == "768" and meta["num_tokens"] == "4"
    layers = json.loads(meta["layers"])
    assert [layer["name"] for layer in layers] == [s.name for s in pva.layers]
    assert layers[0]["name"].endswith("transformer_blocks.0.attn2")
    assert json.loads(meta["provenance"])["initialized_from"] == "SD15"


def test_keys_use_comfyui_block_names(pva, tmp_path):
    from safetensors import safe_open

    with safe_open(str(save_pva(pva, tmp_path / "p.safetensors")), framework="pt") as f:
        keys = set(f.keys())
    assert f"layers.{pva.layers[0].name}.to_q.weight" in keys
    assert any(k.startswith("identity_encoder.transformer.") for k in keys)


def test_the_same_model_is_saved_as_the_same_bytes(pva, tmp_path):
    """A PVA file's bytes depend only on the model (so a file can be recognized by its hash, and
    the test models are reproducible). Control: safetensors alone orders the header's metadata by
    a hash seeded anew for every file, so the same model saved with it differs between saves."""
    import hashlib

    from safetensors.torch import save_file

    from pva.method.weights import metadata_for_file, state_dict_for_file

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    ours = {digest(save_pva(pva, tmp_path / f"ours-{i}.safetensors")) for i in range(5)}
    raw = set()
    for i in range(5):
        save_file(state_dict_for_file(pva), str(tmp_path / f"raw-{i}"), metadata_for_file(pva))
        raw.add(digest(tmp_path / f"raw-{i}"))
    assert len(ours) == 1 and len(raw) > 1, (len(ours), len(raw))
    assert torch.equal(load_pva(tmp_path / "ours-0.safetensors").projections_for(pva.layers[0].name).to_q.weight,
                       pva.projections_for(pva.layers[0].name).to_q.weight)  # fmt: skip


def test_refuses_to_overwrite_and_leaves_no_temp_files(pva, tmp_path):
    path = save_pva(pva, tmp_path / "p.safetensors")
    before = path.read_bytes()
    with pytest.raises(PVAWeightsError, match="already exists"):
        save_pva(pva, path)
    assert path.read_bytes() == before
    save_pva(pva, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_truncated_file_is_explained(pva, tmp_path):
    path = save_pva(pva, tmp_path / "p.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 4):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(PVAWeightsError, match="truncated"):
            load_pva(broken)


def test_missing_and_foreign_files_are_explained(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(PVAWeightsError, match="not found.*models/pva"):
        load_pva(tmp_path / "nope.safetensors")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(PVAWeightsError, match="not a PVA weights file"):
        load_pva(lora)


def test_file_for_another_family_is_explained_on_apply(pva, tmp_path):
    loaded = load_pva(save_pva(pva, tmp_path / "sd15.safetensors"))
    sdxl = tiny_model("sdxl")
    with pytest.raises(
        PVAError, match=r"made for SD1.x \(SD15, 768-d context\); the MODEL is SDXL \(SDXL, 2048-d"
    ):
        apply_identity(sdxl, loaded, loaded.encode(torch.randn(1, 512)))


def test_loading_inside_inference_mode_gives_normal_tensors(pva, tmp_path):
    path = save_pva(pva, tmp_path / "p.safetensors")
    with torch.inference_mode():
        loaded = load_pva(path)
    assert not any(p.is_inference() for p in loaded.parameters())


def test_saved_file_gets_the_users_permissions(pva, tmp_path):
    """Readable by whoever the umask allows (a shared ComfyUI), not only its writer."""
    import os

    previous = os.umask(0o022)
    try:
        path = save_pva(pva, tmp_path / "shared.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"format_version": "one"}, "format_version"),
        ({"encoder": json.dumps({"dim_feedforward_new": 3})}, "damaged PVA header"),
        ({"family": None}, "damaged PVA header"),
    ],
)
def test_damaged_or_unknown_header_fields_are_explained(pva, tmp_path, change, problem):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(save_pva(pva, tmp_path / "p.safetensors")), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in change.items():
        metadata.pop(key) if value is None else metadata.update({key: value})
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    with pytest.raises(PVAWeightsError, match=problem):
        load_pva(damaged)


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_a_save_that_fails_mid_write_leaves_the_old_file_whole(pva, tmp_path, monkeypatch, failure):
    """Atomic save: whatever stops a write half-way (a full disk, Cancel, Ctrl-C), the file under
    the name is the complete old one (or none), and no partial file is left behind."""
    import safetensors.torch

    path = save_pva(pva, tmp_path / "p.safetensors")
    before = path.read_bytes()
    write = safetensors.torch.save_file

    def fail_half_way(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the data so far reached the disk, then the failure
            f.truncate(len(before) // 2)
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", fail_half_way)
    retrained = PVAModel.initialize_from(tiny_model("sd15"), num_tokens=4, seed=9, encoder_depth=1)
    with pytest.raises(type(failure)):
        save_pva(retrained, path, overwrite=True)
    assert path.read_bytes() == before
    with pytest.raises(type(failure)):
        save_pva(retrained, tmp_path / "new person.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
    reloaded = load_pva(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pva.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
