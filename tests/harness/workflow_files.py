"""The shipped workflows as files (workflows/*.json, workflows/api/*.json) and the script that
generates them (scripts/build_workflows.py), for the tests that read them."""

import importlib.util
import json
import sys

from .host import REPO_ROOT


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_workflows", REPO_ROOT / "scripts" / "build_workflows.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


build = _load_builder()
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
NAMES = sorted(wf.name for wf in build.workflows())


def ui_file(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


def api_file(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())
