"""Model folders set in extra_model_paths.yaml (keys `pva:` and `facenet:`), in a real server.

ComfyUI reads the YAML before it loads custom nodes, so the pack must keep those folders when it
registers its own models/pva and models/facenet: the loaders list and load files from both.
"""

import json

import pytest
from harness.checkpoints import facenet_random_weights
from harness.models import tiny_model
from harness.server import make_base_directory

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
