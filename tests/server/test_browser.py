"""The shipped UI workflows in the real ComfyUI web frontend (headless Chromium via Playwright).

Each `workflows/*.json` (UI format; `workflows/api/` holds the API-format twins) is loaded with
the frontend's own `app.loadGraphData`, the path a user's drag-and-drop takes, into a page on the
shared test server. A workflow passes when every node type is registered (and the frontend's
"missing nodes" dialog did not open), every link of the file is in the graph and joins existing
nodes through slots of compatible types, no dialog is open, no uncaught page error happened and
no console error mentions PVA. Then the view is fit to the graph and a 1280x800 screenshot is
taken and checked; it goes to a temporary folder, or with `--screenshots DIR` (what
`scripts/screenshots` passes: docs/screenshots, the README's pictures) to DIR/<workflow>.png.
Two negative controls prove that the checks catch an unknown node type and a dangling link.
All of it runs twice: with the frontend the host pins and with the newest one on the registry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from harness.browser import Browser, ComfyPage, quiet_first_visit, read_workflow
from harness.host import REPO_ROOT, newest_frontend
from harness.server import ComfyServer, make_base_directory
from PIL import Image

WORKFLOW_DIR = REPO_ROOT / "workflows"
UI_WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))  # top level only: workflows/api/ is API format
PACK_MODULE = "comfyui-pva"
IMAGE_LOADERS = ("LoadImage", "LoadImageMask")

pytestmark = pytest.mark.browser


def _input_images(workflows: list[dict]) -> set[str]:
    names = set()
    for workflow in workflows:
        for node in workflow.get("nodes", []):
            values = node.get("widgets_values")
            if node.get("type") in IMAGE_LOADERS and isinstance(values, list) and values:
                names.add(str(values[0]))
    return names


def _write_input_images(input_dir: Path, names: set[str]) -> None:
    """Example photos under the names the workflows' image loaders use, so that the screenshots
    show image previews (and the page asks for no missing file). astronaut() from the same
    helper the end-to-end tests use: references for *reference*, the face mask for *mask*."""
    from harness.references import face_mask, reference_photos, target_photo

    references = reference_photos()
    for name in sorted(names):
        path = input_dir / name
        if path.exists() or "/" in name or not name.lower().endswith(".png"):
            continue
        lower = name.lower()
        if "mask" in lower:
            pixels = face_mask(512).astype(np.uint8) * 255
        elif "reference" in lower or "ref" in lower:
            digits = [int(c) for c in lower if c.isdigit()]
            pixels = references[(digits[-1] - 1 if digits else 0) % len(references)]
        else:
            pixels = target_photo(512)
        input_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert("RGB").save(path)


@pytest.fixture(scope="module", params=["host frontend", "newest frontend"])
def frontend(request) -> tuple[str, Path] | None:
    """None: the frontend the host pins. Else (version, folder) of the newest frontend on the
    registry, installed by scripts/dev-setup beside it."""
    return newest_frontend() if request.param == "newest frontend" else None


@pytest.fixture(scope="module")
def ui_server(frontend, comfy_server, tmp_path_factory) -> ComfyServer:
    """The shared server, or a server of the same host serving the newest frontend."""
    if frontend is None:
        yield comfy_server
        return
    base = make_base_directory(tmp_path_factory.mktemp("comfy-base-newest-frontend"), REPO_ROOT)
    server = ComfyServer(base, ("--front-end-root", str(frontend[1]))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pva_node_types(ui_server) -> list[str]:
    info = ui_server.object_info()
    types = sorted(name for name, spec in info.items() if PACK_MODULE in str(spec.get("python_module", "")))
    assert types, "the test server registered no node of this pack"
    return types


@pytest.fixture(scope="module")
def ui(ui_server, frontend) -> ComfyPage:
    """One headless Chromium page on the server's web UI, ready for loadGraphData."""
    _write_input_images(ui_server.base / "input", _input_images([read_workflow(p) for p in UI_WORKFLOWS]))
    quiet_first_visit(ui_server.url)
    with Browser() as browser:
        page = browser.new_page()
        page.open(ui_server.url)
        if frontend:  # the page runs the frontend asked for, not the host's
            assert page.frontend_version() == frontend[0]
        yield page


def _file_links(workflow: dict) -> list[list]:
    links = []
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # schema 1.0 writes objects
            link = [
                link["id"],
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link["type"],
            ]
        links.append(list(link[:6]))
    return links


def load_and_check(
    ui: ComfyPage, workflow: dict, pva_node_types: list[str], name: str | None = None
) -> tuple[list[str], dict]:
    """Load `workflow` into the page; return (problems, the graph report). No problems = pass."""
    ui.close_dialogs()
    ui.clear_errors()
    report = ui.load_workflow(workflow, name)
    problems = []
    if report["unregisteredInFile"]:
        problems.append(f"node types the frontend does not know: {report['unregisteredInFile']}")
    if report["unregistered"]:
        problems.append(f"nodes of unregistered types in the graph: {report['unregistered']}")
    dialog = ui.missing_nodes_dialog()
    if dialog:
        problems.append(f"the missing-nodes dialog is open: {dialog!r}")
    other_dialogs = [text for text in ui.dialog_texts() if not dialog or dialog not in text]
    if other_dialogs:
        problems.append(f"dialogs open after loading: {[text[:300] for text in other_dialogs]}")
    if report["nodeCount"] != report["fileNodeCount"]:
        problems.append(f"the file has {report['fileNodeCount']} nodes, the graph {report['nodeCount']}")
    graph_links = {link[0]: link for link in report["links"]}
    for link in _file_links(workflow):
        loaded = graph_links.get(link[0])
        if loaded is None:
            problems.append(f"link {link} of the file is not in the graph")
        elif loaded[:5] != link[:5]:
            problems.append(f"link {link} of the file is {loaded} in the graph")
    if report["linkCount"] != report["fileLinkCount"]:
        problems.append(f"the file has {report['fileLinkCount']} links, the graph {report['linkCount']}")
    problems += [f"broken link {b['id']}: {b['why']}" for b in report["broken"]]
    relevant = [e for e in ui.errors if not e.is_offline_noise(ui.server_url)]
    problems += [f"uncaught page error: {e}" for e in relevant if e.kind == "pageerror"]
    problems += [
        f"console error about PVA: {e}"
        for e in relevant
        if e.kind == "console" and e.mentions_any(["PVA", *pva_node_types])
    ]
    return problems, report


def test_ui_workflows_exist():
    assert UI_WORKFLOWS, f"no UI workflows in {WORKFLOW_DIR} (workflows/*.json)"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_workflow_loads_in_frontend(ui, frontend, pva_node_types, path, screenshot_dir, tmp_path):
    workflow = read_workflow(path)
    file_types = {node.get("type") for node in workflow.get("nodes", [])}
    assert file_types & set(pva_node_types), f"{path.name} uses no node of this pack"

    problems, report = load_and_check(ui, workflow, pva_node_types, path.stem)
    assert not problems, f"{path.name} in the ComfyUI frontend:\n" + "\n".join(problems)
    assert set(pva_node_types) & set(report["types"])

    ui.fit_view()
    assert not ui.off_screen_nodes(), "fit view left nodes outside the canvas"
    previews = ui.wait_for_image_previews()
    # The README's pictures show the frontend the host pins.
    shot = ui.screenshot((screenshot_dir if frontend is None else tmp_path) / f"{path.stem}.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (800, 1280, 3)
    # Not a blank page: a rendered graph has many colours (nodes, links, text, previews).
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, f"{shot} looks blank"
    assert previews, "image previews did not load: " + "; ".join(map(str, ui.errors))


def _first_pva_node(workflow: dict, pva_node_types: list[str]) -> dict:
    return next(node for node in workflow["nodes"] if node["type"] in pva_node_types)


def test_negative_control_unknown_node_type_is_detected(ui, pva_node_types):
    """The same check on a copy with one PVA node renamed to a type nobody registers."""
    assert UI_WORKFLOWS, "no UI workflows to make the control from"
    workflow = copy.deepcopy(read_workflow(UI_WORKFLOWS[0]))
    missing_type = "PVANodeThatDoesNotExist"
    _first_pva_node(workflow, pva_node_types)["type"] = missing_type
    try:
        problems, report = load_and_check(ui, workflow, pva_node_types)
        print("negative control (unknown node type) found:", *problems, sep="\n  ")
        assert problems, "the check passed a workflow with an unknown node type"
        assert report["unregisteredInFile"] == [missing_type]
        assert [n["type"] for n in report["unregistered"]] == [missing_type]
        dialog = ui.missing_nodes_dialog(open_issues=True)
        assert dialog and missing_type in dialog, "the frontend's missing-nodes dialog did not name the type"
    finally:
        ui.close_dialogs()


def test_negative_control_dangling_link_is_detected(ui, pva_node_types):
    """The same check on a copy where a link points at a node that is not in the file."""
    workflow = copy.deepcopy(read_workflow(UI_WORKFLOWS[0]))
    link = workflow["links"][0]
    ghost = max(node["id"] for node in workflow["nodes"]) + 1000
    if isinstance(link, dict):
        link["target_id"] = ghost
    else:
        link[3] = ghost
    try:
        problems, _ = load_and_check(ui, workflow, pva_node_types)
        print("negative control (dangling link) found:", *problems, sep="\n  ")
        assert any(f", {ghost}, " in p and "not in the graph" in p for p in problems) or any(
            p.startswith("broken link") for p in problems
        ), "the check passed a workflow with a dangling link:\n" + json.dumps(problems)
    finally:
        ui.close_dialogs()
