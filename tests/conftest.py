"""Fixtures for tests against the real ComfyUI host (imported as a library, or as a server)."""

import pytest
from harness.host import REPO_ROOT, import_comfy_on_cpu
from harness.server import ComfyServer, make_base_directory

# Library tests import the method as `import pva`; the host itself is imported on CPU.
import_comfy_on_cpu()


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
