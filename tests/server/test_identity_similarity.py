"""The Identity Similarity (PVA) node in a real ComfyUI server, on real faces.

Graphs a user would build: LoadImage -> Identity Similarity, with the reference photos batched
by core nodes. Checked through /history (the node's preview and summary): dlib finds the same
person in the astronaut's mirror image and a different person in another portrait; a photo
without a face is scored 0 with a message instead of failing the prompt; an ONNX recognizer put
in models/face_recognition is offered and gives the same number as the library; an IDENTITY
works with the facenet recognizer and is refused, with the fix, by the others.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness.portraits import portrait
from harness.references import faceless_photo, load_image_batch, save_png, write_references
from harness.server import ComfyError
from harness.tiny_models import export_onnx, tiny_arcface
from PIL import Image

pytestmark = pytest.mark.server

ONNX_NAME = "pva-test-tiny-arcface.onnx"


@pytest.fixture(scope="module")
def inputs(comfy_server):
    folder = comfy_server.base / "input"
    astronaut = portrait("astronaut")
    return {
        "references": write_references(folder, prefix="pva-sim-ref"),
        "same": save_png(np.ascontiguousarray(astronaut[:, ::-1]), folder, "pva-sim-same.png"),
        "other": save_png(portrait("harbour"), folder, "pva-sim-other.png"),
        "faceless": save_png(faceless_photo(), folder, "pva-sim-faceless.png"),
    }


def read(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)


def similarity_graph(inputs: dict, image: str, recognizer: str = "dlib", **extra) -> dict:
    ref_nodes, batch = load_image_batch(inputs["references"], node_prefix="simref")
    return {
        **ref_nodes,
        "photo": {"class_type": "LoadImage", "inputs": {"image": image}},
        "similarity": {
            "class_type": "PVAIdentitySimilarity",
            "inputs": {
                "images": ["photo", 0],
                "recognizer": recognizer,
                "reference_images": batch,
                "faces": "detect",
                "detection_threshold": 0.9,
                "face_index": 0,
                **extra,
            },
        },
    }


def run_similarity(server, graph: dict) -> dict:
    """The node's UI output: similarity values, summary text, preview images."""
    outputs = server.run(graph)
    ui = outputs["similarity"]
    assert len(ui["images"]) == 1 and ui["images"][0]["type"] == "temp", ui
    return {"values": ui["similarity"], "summary": ui["text"][0], "images": ui["images"]}


def test_dlib_same_person_different_person_and_no_face(comfy_server, inputs):
    same = run_similarity(comfy_server, similarity_graph(inputs, inputs["same"]))
    other = run_similarity(comfy_server, similarity_graph(inputs, inputs["other"]))
    faceless = run_similarity(comfy_server, similarity_graph(inputs, inputs["faceless"]))
    print("\n" + "\n".join(r["summary"] for r in (same, other, faceless)))
    assert "dlib" in same["summary"] and "3 reference photos" in same["summary"]
    assert "same person by dlib's rule" in same["summary"]
    assert "different person by dlib's rule" in other["summary"]
    assert same["values"][0] > other["values"][0]
    assert faceless["values"] == [0.0] and "image 1: no face found" in faceless["summary"]


def test_onnx_recognizer_from_the_models_folder(comfy_server, inputs):
    from pva.measure.recognition import FaceLocator, load_recognizer
    from pva.measure.recognition.check import check_identity

    assert "face_recognition" in comfy_server.get_json("/models")  # the pack registered the folder
    folder = comfy_server.base / "models" / "face_recognition"
    folder.mkdir(parents=True, exist_ok=True)
    path = export_onnx(tiny_arcface(seed=1), folder / ONNX_NAME)
    options = comfy_server.get_json("/object_info/PVAIdentitySimilarity")["PVAIdentitySimilarity"]["input"][
        "required"
    ]["recognizer"]
    assert ONNX_NAME in options[1]["options"] and {"dlib", "facenet"} <= set(options[1]["options"])
    served = run_similarity(comfy_server, similarity_graph(inputs, inputs["same"], recognizer=ONNX_NAME))
    # the same computation in this process, from the files the server read
    input_dir = comfy_server.base / "input"
    references = [read(input_dir / name) for name in inputs["references"]]
    local = check_identity(
        [read(input_dir / inputs["same"])],
        load_recognizer(f"onnx:{path}"),
        FaceLocator(),
        reference_images=references,
    )
    assert served["values"][0] == pytest.approx(local.values[0], abs=1e-4)
    assert ONNX_NAME in served["summary"]


def test_identity_input_works_with_facenet_and_is_refused_by_dlib(comfy_server, server_models, inputs):
    ref_nodes, batch = load_image_batch(inputs["references"], node_prefix="idref")
    identity_nodes = {
        **ref_nodes,
        "facenet": {"class_type": "PVAFaceNetLoader", "inputs": {"facenet_name": server_models["facenet"]}},
        "identity": {
            "class_type": "PVAEncodeIdentity",
            "inputs": {
                "facenet": ["facenet", 0],
                "reference_images": batch,
                "detection_threshold": 0.9,
                "face_index": 0,
            },
        },
        "photo": {"class_type": "LoadImage", "inputs": {"image": inputs["same"]}},
    }

    def graph(recognizer):
        return {
            **identity_nodes,
            "similarity": {
                "class_type": "PVAIdentitySimilarity",
                "inputs": {"images": ["photo", 0], "recognizer": recognizer, "identity": ["identity", 0],
                           "facenet": ["facenet", 0], "faces": "detect", "detection_threshold": 0.9, "face_index": 0},
            },
        }  # fmt: skip

    result = run_similarity(comfy_server, graph("facenet"))
    assert "FaceNet" in result["summary"] and "not independent" in result["summary"]
    assert "an IDENTITY of 3 reference faces" in result["summary"] and -1 <= result["values"][0] <= 1
    with pytest.raises(ComfyError, match="an IDENTITY holds FaceNet embeddings.*connect reference_images"):
        comfy_server.run(graph("dlib"))
