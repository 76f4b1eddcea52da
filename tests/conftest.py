"""Fixtures for tests against the real ComfyUI host (imported as a library, or as a server).

Also: the suite's slow parts are marked from the fixtures they use (so new tests are marked
without anyone remembering to), `--fast` runs only the quick library tests, `--screenshots DIR`
is the one way a test run writes the README's screenshots, and a run that leaves the
repository different from how it found it fails.
"""

import hashlib
import subprocess
from pathlib import Path

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


# -- markers, the fast subset ---------------------------------------------------------------------
# A test that uses one of these fixtures gets the marker (pyproject.toml describes them).
FIXTURE_MARKERS = {
    "comfy_server": "server",
    "start_server": "server",
    "server_models": "server",
    "sd15_inpaint_ckpt": "slow",  # the 2.1 GB random-weight checkpoint
    "ui": "browser",
    "host_env": "install",
}
NOT_FAST = ("slow", "server", "browser", "install", "training", "pipeline")
FAST_EXPRESSION = "not (" + " or ".join(NOT_FAST) + ")"


def pytest_addoption(parser):
    group = parser.getgroup("comfyui-pva")
    group.addoption(
        "--fast",
        action="store_true",
        help=f"only the quick library tests: the same as -m '{FAST_EXPRESSION}'",
    )
    group.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="write the web UI screenshots of the shipped workflows to DIR (scripts/screenshots "
        "passes docs/screenshots); without it they go to a temporary folder",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames and marker not in item.keywords:
                item.add_marker(marker)
    if config.getoption("--fast"):
        kept, dropped = [], []
        for item in items:
            (dropped if any(item.get_closest_marker(m) for m in NOT_FAST) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept


@pytest.fixture(scope="session")
def screenshot_dir(request, tmp_path_factory) -> Path:
    """Where the browser tests save their screenshots: --screenshots DIR, else a temporary folder."""
    chosen = request.config.getoption("--screenshots")
    return Path(chosen).resolve() if chosen else tmp_path_factory.mktemp("screenshots")


# -- the repository is left as it was found -----------------------------------------------------
_STATE_AT_START = pytest.StashKey[dict | None]()


def _repository_state() -> dict[str, str] | None:
    """Every changed or untracked (not ignored) path of the work tree -> its git status and a hash
    of its content; None outside a git work tree."""
    try:
        listing = subprocess.run(
            ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return None
    state = {}
    for entry in filter(None, listing.split("\0")):
        status, path = entry[:2], entry[3:]
        file = REPO_ROOT / path
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "-"
        state[path] = f"{status} {digest}"
    return state


def pytest_sessionstart(session):
    session.config.stash[_STATE_AT_START] = _repository_state()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_STATE_AT_START, None)
    after = _repository_state()
    if before is None or after is None:
        return
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    chosen = session.config.getoption("--screenshots")
    if chosen:  # asked for: scripts/screenshots updates the README's pictures
        allowed = Path(chosen).resolve()
        changed = [p for p in changed if not (REPO_ROOT / p).resolve().is_relative_to(allowed)]
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (
            "the repository changed during the test run (tests must write elsewhere; or were these "
            "edited meanwhile?): " + ", ".join(changed)
        )
        if reporter is not None:
            reporter.write_sep("=", message, red=True, bold=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
