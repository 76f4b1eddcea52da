"""Running the pack's scripts (pretraining, evaluation) outside ComfyUI's server: ComfyUI imported
as a library, and HuggingFace accelerate set up for one process, several GPUs or several machines.

Launch a script with plain `python` (one process: a GPU, or the CPU), `accelerate launch
--num_processes N` or `torchrun --nproc_per_node N` (several GPUs), and for several machines
`--num_machines/--machine_rank/--main_process_ip` (accelerate) or `--nnodes/--node_rank/
--master_addr` (torchrun).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PVAError, PVAWeightsError

if TYPE_CHECKING:
    from accelerate import Accelerator

PACK_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_MISSING = (
    "HuggingFace accelerate is not installed; it runs the pack's training and evaluation scripts: "
    "`pip install accelerate` (it keeps your torch), or `pip install -e .[train]` in this pack's folder."
)


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


def make_accelerator(
    cpu: bool | None = None,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
    project_dir: str | os.PathLike | None = None,
) -> Accelerator:
    """An Accelerator for this launch. cpu: None = the CPU when torch sees no GPU.

    Refuses to run when the launcher started several processes but accelerate sees one: with a
    CUDA build of torch on a machine without a GPU, accelerate (1.15) otherwise reports
    DistributedType.NO and every process trains alone, silently."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
    except ImportError as error:
        raise PVAError(ACCELERATE_MISSING) from error
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise PVAError("mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU.")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(project_dir)) if project_dir else None,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise PVAError(
            f"the launcher started {launched} processes but accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone. On a machine without a GPU pass "
            "--cpu (or set ACCELERATE_USE_CPU=1); with GPUs check that torch sees them."
        )
    return accelerator


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
