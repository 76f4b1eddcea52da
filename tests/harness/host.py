"""Where the real ComfyUI host is, and how to import it as a library on CPU."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _dev_setting(name: str) -> str | None:
    """$name, else the value scripts/dev-setup recorded for it in $PVA_DEV_HOME/env.sh."""
    value = os.environ.get(name)
    if not value:
        env_file = Path(os.environ.get("PVA_DEV_HOME", Path.home() / ".cache/comfyui-pva")) / "env.sh"
        if env_file.exists():
            for line in env_file.read_text().splitlines():
                if line.startswith(f"{name}="):
                    value = line.split("=", 1)[1]
    return value or None


def comfyui_path() -> Path:
    """The host set up by scripts/dev-setup ($COMFYUI_PATH, else the path recorded in env.sh)."""
    path = _dev_setting("COMFYUI_PATH")
    if not path or not (Path(path) / "main.py").exists():
        raise RuntimeError(
            "No ComfyUI host found: run scripts/dev-setup (or scripts/test) first, or set COMFYUI_PATH."
        )
    return Path(path)


def newest_frontend() -> tuple[str, Path]:
    """(version, static folder) of the newest ComfyUI frontend scripts/dev-setup installed beside
    the host's own, for serving with --front-end-root."""
    root = _dev_setting("PVA_NEWEST_FRONTEND")
    version = _dev_setting("PVA_NEWEST_FRONTEND_VERSION")
    if not root or not version or not (Path(root) / "index.html").exists():
        raise RuntimeError(
            "The newest ComfyUI frontend is not installed: run scripts/dev-setup (or scripts/test) first."
        )
    return version, Path(root)


def import_comfy_on_cpu() -> Path:
    """Put the host on sys.path and make comfy pick the CPU before model_management loads."""
    host = comfyui_path()
    # The host goes first: its top-level `nodes` module must win over this pack's `nodes/`
    # folder (inside ComfyUI the pack is a package, so the two never clash there).
    for path in (str(REPO_ROOT), str(host)):
        if path in sys.path:
            sys.path.remove(path)
    sys.path[:0] = [str(host), str(REPO_ROOT)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (fixes the device now, on CPU)

    return host


def portrait_packages() -> Path:
    """The pinned copy of ComfyUI's workflow-template media packages that the test portraits come
    from (installed by scripts/dev-setup, apart from the host's own)."""
    root = _dev_setting("PVA_PORTRAITS")
    if not root or not Path(root).is_dir():
        raise RuntimeError(
            "The test portraits are not installed: run scripts/dev-setup (or scripts/test) first."
        )
    return Path(root)
