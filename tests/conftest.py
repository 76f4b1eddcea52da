"""Fixtures for tests against the real ComfyUI host (imported as a library, or as a server)."""

import pytest
from harness.host import REPO_ROOT, import_comfy_on_cpu
from harness.server import ComfyServer, make_base_directory

# Library tests import the method as `import pva`; the host itself is imported on CPU.
import_comfy_on_cpu()
# ComfyUI's own top-level `nodes` module, imported now: pytest may later put the repository
# root (which has a nodes/ folder of its own) ahead of the host on sys.path.
import nodes  # noqa: E402

assert hasattr(nodes, "InpaintModelConditioning"), f"`nodes` resolved to {nodes.__file__}, not ComfyUI's"


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server with this pack, shared by the session's server tests."""
    base = make_base_directory(tmp_path_factory.mktemp("comfy-base"), REPO_ROOT)
    server = ComfyServer(base).start()
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with a custom base directory (for import-failure tests)."""
    servers = []

    def start(base, extra_args=()):
        server = ComfyServer(base, tuple(extra_args)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def sd15_inpaint_ckpt():
    """Path of the cached random-weight SD1.5-inpainting checkpoint (the real layout, fp16,
    2.1 GB in $PVA_DEV_HOME/test-models), built on first use in about 30 s."""
    from harness.checkpoints import sd15_inpaint_checkpoint

    return sd15_inpaint_checkpoint()


@pytest.fixture(scope="session")
def server_models(comfy_server, sd15_inpaint_ckpt):
    """The random SD1.5-inpainting checkpoint and a random FaceNet, linked into the shared
    server's models/checkpoints and models/facenet: {"checkpoint": name, "facenet": name}."""
    from harness.checkpoints import link_into_models

    return link_into_models(comfy_server.base)
