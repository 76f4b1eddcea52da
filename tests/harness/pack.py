"""Load this pack in-process the way ComfyUI's loader does (a package from a folder)."""

import asyncio
import importlib.util
import sys

from .host import REPO_ROOT, import_comfy_on_cpu

PACKAGE_NAME = "comfyui_pva_under_test"


def load_pack():
    import_comfy_on_cpu()
    if PACKAGE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE_NAME]


def registered_node_ids() -> list[str]:
    extension = asyncio.run(load_pack().comfy_entrypoint())
    return [node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())]
