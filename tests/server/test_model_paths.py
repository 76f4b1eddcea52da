"""Model folders set in extra_model_paths.yaml (keys `pva:` and `facenet:`), in a real server.

ComfyUI reads the YAML before it loads custom nodes, so the pack must keep those folders when it
registers its own models/pva and models/facenet: the loaders list and load files from both.
"""

import json

import pytest
from harness.checkpoints import facenet_random_weights
from harness.models import tiny_model
from harness.server import ComfyError, make_base_directory

from pva.method.model import PVAModel
from pva.method.weights import save_pva


@pytest.fixture
def shared_models(tmp_path):
    """A model folder outside ComfyUI, as a user with several installs keeps one: a PVA file and
    a FaceNet file, and the extra_model_paths.yaml that points at them."""
    shared = tmp_path / "shared-models"
    weights = PVAModel.initialize_from(tiny_model("sd15"), num_tokens=4, seed=0, encoder_depth=1)
    save_pva(weights, shared / "people" / "elsewhere_person.safetensors")
    (shared / "face").mkdir(parents=True)
    (shared / "face" / "elsewhere_facenet.pt").symlink_to(facenet_random_weights())
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"my_shared_models:\n    base_path: {shared}\n    pva: people\n    facenet: face\n")
    return config


def _options(server, node_type, input_name):
    spec = server.get_json(f"/object_info/{node_type}")[node_type]["input"]["required"][input_name]
    return spec[1]["options"] if isinstance(spec[1], dict) and "options" in spec[1] else spec[0]


def test_loaders_find_models_in_extra_model_paths_folders(tmp_path, start_server, shared_models):
    base = make_base_directory(tmp_path / "base")
    save_pva(
        PVAModel.initialize_from(tiny_model("sd15"), num_tokens=4, seed=1, encoder_depth=1),
        base / "models" / "pva" / "local_person.safetensors",
    )
    server = start_server(base, ["--extra-model-paths-config", str(shared_models)])
    # both the YAML's folder and the default models/pva
    assert {"elsewhere_person.safetensors", "local_person.safetensors"} <= set(
        _options(server, "PVAModelLoader", "pva_name")
    )
    assert "elsewhere_facenet.pt" in _options(server, "PVAFaceNetLoader", "facenet_name")
    outputs = server.run(
        {
            "pva": {"class_type": "PVAModelLoader", "inputs": {"pva_name": "elsewhere_person.safetensors"}},
            "facenet": {"class_type": "PVAFaceNetLoader", "inputs": {"facenet_name": "elsewhere_facenet.pt"}},
            "show_pva": {"class_type": "PreviewAny", "inputs": {"source": ["pva", 0]}},
            "show_facenet": {"class_type": "PreviewAny", "inputs": {"source": ["facenet", 0]}},
        }
    )  # fmt: skip
    assert "PVAModel" in json.dumps(outputs["show_pva"]), outputs
    assert "FaceNet" in json.dumps(outputs["show_facenet"]), outputs


def test_a_missing_model_file_is_named_by_the_pack_when_the_prompt_is_queued(comfy_server):
    """ComfyUI checks combo values when a prompt is queued and would answer with its generic
    "Value not in list"; the loaders answer first with what is missing, where, and what to do."""
    prompt = {
        "pva": {"class_type": "PVAModelLoader", "inputs": {"pva_name": "renamed_person.safetensors"}},
        "facenet": {"class_type": "PVAFaceNetLoader", "inputs": {"facenet_name": "moved_facenet.pt"}},
        "show_pva": {"class_type": "PreviewAny", "inputs": {"source": ["pva", 0]}},
        "show_facenet": {"class_type": "PreviewAny", "inputs": {"source": ["facenet", 0]}},
    }
    with pytest.raises(ComfyError) as failure:
        comfy_server.queue(prompt)
    message = str(failure.value)
    assert "Value not in list" not in message, message
    errors = {node_id: e["errors"] for node_id, e in failure.value.details["node_errors"].items()}
    assert set(errors) == {"pva", "facenet"}, message
    (pva_error,) = errors["pva"]
    assert "'renamed_person.safetensors' is not in ComfyUI/models/pva/" in pva_error["details"], message
    assert "Save PVA Model" in pva_error["details"] and "refresh" in pva_error["details"], message
    (facenet_error,) = errors["facenet"]
    assert "'moved_facenet.pt' is not in ComfyUI/models/facenet/" in facenet_error["details"], message
    assert "vggface2" in facenet_error["details"], message

    # Identity Similarity's recognizer (built-in names or .onnx files) gets the same message. Files that
    # are there pass the check: test_loaders_find_models_in_extra_model_paths_folders runs them.
    similarity = {
        "image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "check": {
            "class_type": "PVAIdentitySimilarity",
            "inputs": {"images": ["image", 0], "reference_images": ["image", 0], "recognizer": "facenet_missing.onnx"},
        },
    }  # fmt: skip
    with pytest.raises(
        ComfyError, match=r"'facenet_missing.onnx' is not in ComfyUI/models/face_recognition/"
    ):
        comfy_server.queue(similarity)
