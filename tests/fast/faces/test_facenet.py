"""FaceNet loading (.pt / .safetensors, with the checks a user needs) and embeddings, random weights."""

import copy
from pathlib import Path

import pytest
import torch
from facenet_pytorch import InceptionResnetV1
from safetensors.torch import save_file

from pva.errors import PVAError, PVAWeightsError
from pva.faces.facenet import FaceNet, embed_faces, load_facenet

HINT = "put the FaceNet VGGFace2 weights (20180402-114759-vggface2.pt) in ComfyUI/models/facenet/"


@pytest.fixture(scope="module")
def reference() -> InceptionResnetV1:
    torch.manual_seed(0)
    model = InceptionResnetV1().eval()
    # random BatchNorm statistics, so a loader that skipped buffers would be caught
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def weight_files(reference, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("facenet")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    # like the official VGGFace2 file: an 8631-class classifier the embedding does not use
    state["logits.weight"] = torch.randn(8631, 512)
    state["logits.bias"] = torch.randn(8631)
    files = {"pt": folder / "20180402-114759-vggface2.pt", "safetensors": folder / "facenet.safetensors"}
    torch.save(state, files["pt"])
    save_file(state, str(files["safetensors"]))
    return files


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    # standardized crops lie in [-1, 1]
    return torch.rand(3, 3, 160, 160, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def loaded(weight_files) -> InceptionResnetV1:
    return load_facenet(weight_files["pt"]).model


def test_loads_both_formats_and_embeds(weight_files, reference, crops):
    from_pt = load_facenet(weight_files["pt"])
    from_st = load_facenet(str(weight_files["safetensors"]))
    for facenet in (from_pt, from_st):
        assert isinstance(facenet, FaceNet) and isinstance(facenet.model, InceptionResnetV1)
        assert not facenet.model.training
        assert not any(p.requires_grad for p in facenet.model.parameters())
        assert not hasattr(facenet.model, "logits")

    emb_pt = from_pt.embed(crops)
    emb_st = from_st.embed(crops)
    assert emb_pt.shape == (3, 512) and emb_pt.dtype == torch.float32
    torch.testing.assert_close(emb_pt.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb_pt, emb_st, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(emb_pt, reference(crops), rtol=1e-5, atol=1e-5)


def test_comfyui_manages_its_memory(weight_files, crops):
    """FaceNet is a ComfyUI-managed model, as core's CLIP vision is: embedding loads it through
    model management (which counts its size and can offload it when another model needs room)."""
    import comfy.model_management as mm

    facenet = load_facenet(weight_files["pt"])
    size = sum(t.numel() * t.element_size() for t in facenet.model.state_dict().values())
    assert facenet.patcher.model is facenet.model
    assert abs(facenet.patcher.model_size() - size) < 0.01 * size
    assert not any(m.model is facenet.patcher for m in mm.current_loaded_models)
    facenet.embed(crops[:1])
    assert any(m.model is facenet.patcher for m in mm.current_loaded_models)
    mm.unload_all_models()
    assert not any(m.model is facenet.patcher for m in mm.current_loaded_models)


def test_embeds_on_the_models_dtype(loaded, crops):
    expected = embed_faces(loaded, crops[:2])
    got = embed_faces(copy.deepcopy(loaded).to(torch.float64), crops[:2])
    assert got.dtype == torch.float32 and got.device == crops.device
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_embed_rejects_bad_crops(loaded):
    for bad in (torch.zeros(3, 160, 160), torch.zeros(1, 160, 160, 3), torch.zeros(0, 3, 160, 160)):
        with pytest.raises(PVAError, match="face crops"):
            embed_faces(loaded, bad)


def test_missing_file(tmp_path):
    path = tmp_path / "models" / "facenet" / "20180402-114759-vggface2.pt"
    with pytest.raises(PVAWeightsError) as error:
        load_facenet(path)
    message = str(error.value)
    assert str(path) in message and "not found" in message and HINT in message
    with pytest.raises(PVAWeightsError, match="not found"):
        load_facenet(tmp_path)  # a folder is not a weights file


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_truncated_file(weight_files, tmp_path, kind):
    data = weight_files[kind].read_bytes()
    path = tmp_path / f"truncated.{kind}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PVAWeightsError) as error:
        load_facenet(path)
    message = str(error.value)
    assert str(path) in message and "cannot be read" in message and "truncated or corrupt" in message
    assert HINT in message


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_not_a_facenet_state_dict(tmp_path, kind):
    state = torch.nn.Linear(4, 2).state_dict()
    path = tmp_path / f"linear.{kind}"
    torch.save(state, path) if kind == "pt" else save_file(state, str(path))
    with pytest.raises(PVAWeightsError) as error:
        load_facenet(path)
    message = str(error.value)
    expected_keys = sum(not k.endswith("num_batches_tracked") for k in InceptionResnetV1().state_dict())
    assert str(path) in message and "not an InceptionResnetV1" in message
    assert f"of {expected_keys} keys missing (e.g. conv2d_1a.conv.weight)" in message
    assert HINT in message


def test_wrong_shapes(reference, tmp_path):
    state = dict(reference.state_dict())
    state["last_linear.weight"] = torch.zeros(128, 1792)  # a 128-d FaceNet is another model
    path = tmp_path / "facenet128.pt"
    torch.save(state, path)
    with pytest.raises(PVAWeightsError) as error:
        load_facenet(path)
    message = str(error.value)
    assert "1 keys with the wrong shape" in message and "missing" not in message
    assert "last_linear.weight: file [128, 1792], expected [512, 1792]" in message


class _Payload:
    """Unpickling this would create a file: proof that code from the weights file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"conv2d_1a.conv.weight": _Payload(marker)}, path)
    with pytest.raises(PVAWeightsError) as error:
        load_facenet(path)
    message = str(error.value)
    assert str(path) in message and "refused" in message and "weights_only" in message
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(PVAWeightsError, match="is not a state dict"):
        load_facenet(path)


def test_batchnorm_counters_are_optional(reference, crops, tmp_path):
    # num_batches_tracked is training bookkeeping; a file without it is still a full FaceNet
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no-counters.safetensors"
    save_file(state, str(path))
    with torch.no_grad():
        torch.testing.assert_close(load_facenet(path).embed(crops), reference(crops))


def test_the_test_suites_random_facenet_tells_people_apart():
    """The end-to-end tests' FaceNet (random weights, BatchNorm calibrated on real faces) gives
    two different people clearly different embeddings, and one person's two photos closer ones:
    otherwise every end-to-end 'two identities' check would compare one identity with itself."""
    from harness.checkpoints import facenet_random_weights
    from harness.portraits import portrait

    from pva.faces.embeddings import embed_photos

    facenet = load_facenet(facenet_random_weights())

    def embedding(name):
        return embed_photos(torch.from_numpy(portrait(name)).float().div(255)[None], facenet).embeddings[0]

    astronaut, veil = embedding("astronaut"), embedding("veil")
    before, after = embedding("wheat_before"), embedding("wheat_after")
    different, same = float(astronaut @ veil), float(before @ after)
    print(f"\n[facenet] test FaceNet cosine: two people {different:.3f}, one person twice {same:.3f}")
    assert different < 0.5 and same > different + 0.2
