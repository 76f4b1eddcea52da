"""Fixtures for tests against the real ComfyUI host (imported as a library, or as a server).

Also: the suite's slow parts are marked from the fixtures they use (so new tests are marked
without anyone remembering to), `--fast` runs only tests/fast (the quick library tests), `--screenshots DIR`
is the one way a test run writes the README's screenshots, the cached test models a run needs
are built in the background from its start (the tests that need trained ones run last), and a
run that leaves the repository different from how it found it fails.
"""

import hashlib
import os
import signal
import subprocess
import sys
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
# The tiers are folders: tests/fast (the quick library tests, by wing), tests/slow (training,
# pipelines, trained test models), tests/server (a real server and browser), tests/install.
FAST = Path(__file__).parent / "fast"


def pytest_addoption(parser):
    group = parser.getgroup("comfyui-pva")
    group.addoption(
        "--fast",
        action="store_true",
        help="only the quick library tests: the same as giving the path tests/fast",
    )
    group.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="write the web UI screenshots of the shipped workflows to DIR (scripts/screenshots "
        "passes docs/screenshots); without it they go to a temporary folder",
    )


def pytest_collection_modifyitems(config, items):
    from harness import artefacts

    artefacts.register_all()
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames and marker not in item.keywords:
                item.add_marker(marker)
        # a test model that takes minutes to build keeps a test out of the quick loop
        if any(artefacts.ARTEFACTS[n].slow for n in _models_needed(item)) and "training" not in item.keywords:
            item.add_marker("training")
    misplaced = [
        f"{item.nodeid} ({', '.join(m for m in NOT_FAST if item.get_closest_marker(m))})"
        for item in items
        if item.path.is_relative_to(FAST) and any(item.get_closest_marker(m) for m in NOT_FAST)
    ]
    if misplaced:
        raise pytest.UsageError(
            "tests/fast holds only quick library tests; move these to tests/slow or tests/server: "
            + "; ".join(misplaced)
        )
    items[:] = _trained_models_last(items)


def pytest_ignore_collect(collection_path, config):
    """--fast: nothing outside tests/fast is collected (or imported)."""
    if not config.getoption("--fast"):
        return None
    tests = FAST.parent
    if (
        collection_path.is_relative_to(tests)
        and collection_path != tests
        and collection_path.name != "conftest.py"
    ):
        inside = collection_path.is_relative_to(FAST) or FAST.is_relative_to(collection_path)
        return None if inside else True
    return None


# -- the cached test models (harness/artefacts.py) -----------------------------------------------
# What a test needs: @pytest.mark.test_models(...) names them; these fixtures imply theirs.
MODELS_BY_FIXTURE = {
    "sd15_inpaint_ckpt": ("sd15-inpainting-random",),
    "server_models": ("sd15-inpainting-random", "facenet-random"),
}
_BUILDER = pytest.StashKey[subprocess.Popen | None]()


def _models_needed(item) -> set[str]:
    names = {name for mark in item.iter_markers("test_models") for name in mark.args}
    for fixture, models in MODELS_BY_FIXTURE.items():
        if fixture in item.fixturenames:
            names.update(models)
    return names


def _trained_models_last(items: list) -> list:
    """Whole modules (their fixtures are set up once) in their order, except that the modules
    with a test that needs a trained test model run last, in the order those models are built:
    the background builder gets the rest of the run to make them."""
    from harness import artefacts

    order = list(artefacts.ARTEFACTS)
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)

    def readiness(module_items: list) -> int:
        needed = set().union(*(_models_needed(i) for i in module_items))
        return max((order.index(n) for n in needed if artefacts.ARTEFACTS[n].slow), default=-1)

    ranked = sorted(modules.values(), key=readiness)  # stable: untouched modules keep their order
    return [item for module_items in ranked for item in module_items]


def pytest_collection_finish(session):
    """Start building the test models the selected tests need and the cache lacks, one at a
    time in a background process (one thread each), while the other tests run."""
    from harness import artefacts

    needed = set().union(*(_models_needed(item) for item in session.items)) if session.items else set()
    missing = [name for name in artefacts.ARTEFACTS if name in needed and not artefacts.is_built(name)]
    session.config.stash[_BUILDER] = None
    if missing:
        log = open(artefacts.cache_dir().parent / "test-models-build.log", "w")  # noqa: SIM115
        session.config.stash[_BUILDER] = subprocess.Popen(
            [sys.executable, str(Path(artefacts.__file__)), "build", *missing],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its builder processes stop with it
        )
        log.close()


def _stop_builder(config) -> None:
    builder = config.stash.get(_BUILDER, None)
    if builder is not None and builder.poll() is None:
        os.killpg(builder.pid, signal.SIGTERM)
        builder.wait()


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
    _stop_builder(session.config)
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
