"""Launching the pack's scripts (pretraining, evaluation) outside ComfyUI's server: one function
sets up HuggingFace accelerate for one process, several GPUs or several machines, and then
imports ComfyUI on the device accelerate chose.

Launch a script with plain `python` (one process: a GPU, or the CPU), `accelerate launch
--num_processes N` or `torchrun --nproc_per_node N` (several GPUs), and for several machines
`--num_machines/--machine_rank/--main_process_ip` (accelerate) or `--nnodes/--node_rank/
--master_addr` (torchrun).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import PVAError
from .host.launch import import_comfyui

if TYPE_CHECKING:
    from accelerate import Accelerator

ACCELERATE_MISSING = (
    "HuggingFace accelerate is not installed; it runs the pack's training and evaluation scripts: "
    "`pip install accelerate` (it keeps your torch), or `pip install -e .[train]` in this pack's folder."
)


def launch(
    comfyui: str | os.PathLike | None = None,
    cpu: bool | None = None,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
    project_dir: str | os.PathLike | None = None,
) -> Accelerator:
    """The one launch sequence of a script: accelerate first (it gives each process its GPU),
    then ComfyUI, imported for that device (its model management asks for a device when it is
    imported). cpu: None = the CPU when torch sees no GPU. Returns the Accelerator."""
    accelerator = make_accelerator(cpu, mixed_precision, gradient_accumulation_steps, log_with, project_dir)
    import_comfyui(comfyui, cpu=accelerator.device.type == "cpu")
    return accelerator


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
