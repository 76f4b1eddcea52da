"""ComfyUI as a library (the pack's scripts and tests): finding it, importing it on the right
device, loading a checkpoint as Load Checkpoint does, its version."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import PVAError, PVAWeightsError

PACK_ROOT = Path(__file__).resolve().parents[2]


def find_comfyui(path: str | os.PathLike | None = None) -> Path:
    """ComfyUI's folder: `path`, else $COMFYUI_PATH, else the ComfyUI this pack is installed in
    (ComfyUI/custom_nodes/<pack>), else the developer setup's (scripts/dev-setup)."""
    candidates: list[Path] = []
    if path:
        candidates.append(Path(path))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    candidates.append(PACK_ROOT.parent.parent)
    env_file = Path(os.environ.get("PVA_DEV_HOME", Path.home() / ".cache/comfyui-pva")) / "env.sh"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            if line.startswith("COMFYUI_PATH="):
                candidates.append(Path(line.split("=", 1)[1]))
    for candidate in candidates:
        if (candidate / "main.py").is_file() and (candidate / "comfy").is_dir():
            return candidate.resolve()
    raise PVAError(
        "ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH (the folder with main.py). "
        f"Looked in: {', '.join(str(c) for c in candidates)}."
    )


def import_comfyui(path: str | os.PathLike | None = None, cpu: bool = False) -> Path:
    """Make `comfy` and ComfyUI's `nodes` importable and pick the device before ComfyUI's model
    management is imported (it asks CUDA for a device at import time)."""
    host = find_comfyui(path)
    # ComfyUI goes ahead of this pack: its top-level `nodes` module must win over the pack's
    # nodes/ folder (inside ComfyUI the pack is a package, so the two never clash there).
    for entry in (str(PACK_ROOT), str(host)):
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path[:0] = [str(host), str(PACK_ROOT)]
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (fixes the device now)

    import nodes

    if not hasattr(nodes, "InpaintModelConditioning"):
        raise PVAError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py; check sys.path.")
    return host


def load_checkpoint(path: str | os.PathLike) -> tuple:
    """MODEL, CLIP and VAE of a checkpoint file (SD1.x / SD2.x / SDXL), as ComfyUI's Load
    Checkpoint loads them; a missing or unreadable file gets the pack's error naming it."""
    import comfy.sd

    path = Path(path)
    if not path.is_file():
        raise PVAWeightsError(f"checkpoint {path} not found; give an SD1.x / SD2.x / SDXL checkpoint file.")
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True
        )
    except Exception as error:  # ComfyUI raises plain RuntimeErrors for files it cannot read
        raise PVAWeightsError(f"checkpoint {path} cannot be loaded by ComfyUI ({error}).") from None
    if model is None or clip is None or vae is None:
        raise PVAWeightsError(
            f"checkpoint {path}: ComfyUI found no diffusion model, text encoder and VAE in it."
        )
    return model, clip, vae


def load_split_model(
    diffusion_model: str | os.PathLike, text_encoders: list, clip_type: str, vae: str | os.PathLike
) -> tuple:
    """MODEL, CLIP and VAE from separate files (Flux and other DiTs ship so), as Load Diffusion
    Model, the CLIP loaders (CLIPLoader / DualCLIPLoader, `clip_type` e.g. flux) and Load VAE load
    them; each missing or unreadable file is named."""
    import comfy.sd
    import comfy.utils

    paths = {
        "--diffusion-model": [Path(diffusion_model)],
        "--text-encoders": [Path(p) for p in text_encoders],
        "--vae": [Path(vae)],
    }
    for option, files in paths.items():
        for path in files:
            if not path.is_file():
                raise PVAWeightsError(f"{option}: {path} not found.")
    types = {t.name.lower(): t for t in comfy.sd.CLIPType}
    if clip_type not in types:
        raise PVAError(f"--clip-type: {clip_type!r} is not one of ComfyUI's: {', '.join(sorted(types))}.")
    loaded = []
    for option, load in (
        ("--diffusion-model", lambda: comfy.sd.load_diffusion_model(str(paths["--diffusion-model"][0]))),
        (
            "--text-encoders",
            lambda: comfy.sd.load_clip(
                ckpt_paths=[str(p) for p in paths["--text-encoders"]], clip_type=types[clip_type]
            ),
        ),
        ("--vae", lambda: comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["--vae"][0])))),
    ):
        try:
            loaded.append(load())
        except Exception as error:  # ComfyUI raises plain RuntimeErrors for files it cannot read
            names = ", ".join(str(p) for p in paths[option])
            raise PVAWeightsError(f"{option}: {names} cannot be loaded by ComfyUI ({error}).") from None
    if loaded[0] is None:
        raise PVAWeightsError(
            f"--diffusion-model: ComfyUI recognises no diffusion model in {paths['--diffusion-model'][0]}."
        )
    return tuple(loaded)


def comfyui_version() -> str:
    import comfyui_version as version  # ComfyUI's own module (0.3.x and later)

    return version.__version__
