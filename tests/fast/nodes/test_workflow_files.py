"""The shipped workflow files are exactly what scripts/build_workflows.py generates from their
one description (so the description, the UI files and their API twins cannot drift), and each
one's Note says which model files to load and where. (Against a live server:
tests/server/test_workflows.py.)"""

import pytest
from harness.host import REPO_ROOT
from harness.workflow_files import NAMES, api_file, build, ui_file


def test_committed_files_are_exactly_what_the_build_script_generates():
    files = build.render_all(build.load_snapshot())
    assert sorted(files) == sorted(
        [f"workflows/{n}.json" for n in NAMES] + [f"workflows/api/{n}.json" for n in NAMES]
    )
    for rel, text in files.items():
        path = REPO_ROOT / rel
        assert path.is_file(), f"{rel} is missing: run scripts/build_workflows.py"
        assert path.read_text() == text, f"{rel} differs from its description: run scripts/build_workflows.py"
    assert build.stale_files(files) == [], "workflows/ holds JSON files the build script does not make"
    assert len(NAMES) >= 8 and set(NAMES) >= {
        "pva_face_inpainting",
        "pva_face_inpainting_with_prompt",
        "pva_quick_personalize_and_inpaint",
        "pva_inpaint_with_saved_person",
        "pva_face_detailer_large_photo",
        "pva_two_people",
        "pva_face_swap",
        "pva_lower_face_edit",
    }


@pytest.mark.parametrize("name", NAMES)
def test_note_says_which_model_files_to_load_and_where(name):
    ui = ui_file(name)
    notes = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert "models/checkpoints" in text and "models/facenet" in text
    for node in api_file(name).values():
        for key in ("ckpt_name", "facenet_name", "pva_name", "image"):
            if isinstance(node["inputs"].get(key), str):  # a file name, not a link
                assert node["inputs"][key] in text, f"{name}: the note does not mention {node['inputs'][key]}"
    if any(node["class_type"] == "PVAModelLoader" for node in api_file(name).values()):
        assert "models/pva" in text


def test_the_from_scratch_workflow_trains_at_the_measured_rates():
    """Its Quick Personalize runs the recipe the acceptance test measured: learning rates of the
    PVA parameters and the token, and the default step count."""
    from pva.training.personalize import TrainingSettings
    from pva.training.recipe import FROM_SCRATCH_LEARNING_RATE

    (node,) = [
        n
        for n in api_file("pva_personalize_from_scratch").values()
        if n["class_type"] == "PVAQuickPersonalize"
    ]
    inputs = node["inputs"]
    assert inputs["learning_rate"] == FROM_SCRATCH_LEARNING_RATE
    assert inputs["token_learning_rate"] == TrainingSettings().token_learning_rate
    assert inputs["steps"] == TrainingSettings().steps and inputs["recipe"] == "auto"
