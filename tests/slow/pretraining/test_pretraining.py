"""Pretraining on many people with accelerate: gradients really synchronize across processes
(and machines), a resumed run ends exactly where an uninterrupted one does, and bad input gets
a clear error. Runs the real launchers (torchrun, plain python) on CPU (gloo) with a tiny base of
the real SD1.5-inpainting architecture, on synthetic people made from real face photos that went
through the pack's MTCNN + FaceNet preprocessing (tests/harness/pretraining.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness.host import REPO_ROOT, comfyui_path
from harness.pretraining import pretraining_run
from safetensors.torch import load_file

pytestmark = [pytest.mark.training, pytest.mark.test_models("synthetic-people")]

DRIVER = REPO_ROOT / "tests" / "harness" / "pretrain_driver.py"


@pytest.fixture(scope="module")
def world():
    from harness.pretraining import synthetic_world

    return synthetic_world()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # one torch thread per process, and a CUDA build of torch on a machine without a GPU
    return dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _drive(world, out: Path, launcher: list[str] = (), timeout: float = 600, **options) -> list[dict]:
    """Run the driver (under `launcher`, e.g. torchrun) and return what each process saw."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    command = [*launcher] if launcher else [sys.executable]
    command += [str(DRIVER), f"--world={world.root}", f"--out={out}", *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank-{rank}.safetensors"))


def _torchrun(processes: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", *extra]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The reference: one process, 2 micro-batches of 2 accumulated: a global batch of 4."""
    out = tmp_path_factory.mktemp("one-process")
    (seen,) = _drive(world, out, steps=3, batch=2, accumulation=2)
    return out, seen


def test_two_processes_synchronize_their_gradients(world, one_process, tmp_path):
    """2 processes x 1 micro-batch of 2 is the same global batch of 4 as the reference; after 3
    steps both processes hold bit-identical weights, equal to the single process's to float
    rounding (the sum of the two halves' gradients is taken in another order: ~1e-7 relative)."""
    reference_out, reference = one_process
    seen = _drive(
        world, tmp_path, launcher=_torchrun(2, "--master_port", str(_free_port())), steps=3, batch=2
    )
    # the launcher's world, not two processes that each think they are alone
    assert [(s["num_processes"], s["process_index"]) for s in seen] == [(2, 0), (2, 1)]
    assert all(s["distributed_type"] == "DistributedType.MULTI_CPU" for s in seen)
    rank0, rank1, single = _weights(tmp_path, 0), _weights(tmp_path, 1), _weights(reference_out, 0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the two processes diverged"
    moved = max((single[k] - _initial(k, single)).abs().max().item() for k in single)
    worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    assert moved > 1e-3, "training did not move the weights: the comparison would be empty"
    assert worst <= 1e-5 * max(1.0, moved), (worst, moved)
    # the logged losses are the global batch's mean in both runs
    assert seen[0]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert seen[0]["provenance"]["pretrained"]["processes"] == 2
    assert (
        seen[0]["provenance"]["pretrained"]["total_batch"]
        == reference["provenance"]["pretrained"]["total_batch"]
        == 4
    )


def test_two_processes_build_one_latent_cache_that_a_later_run_trains_on_unchanged(world, tmp_path):
    """With cached latents (pva/pretraining/latent_cache.py), 2 processes each encode half of the
    people into one cache and train on it; a later single-process run of the same global batch
    finds the cache complete, encodes nothing, and ends with the same weights (to float rounding,
    as above). Each entry was made once: by rank 0 or rank 1, never both."""
    latents = tmp_path / "latents"
    options = dict(steps=2, batch=2, latents="cached", latents_dir=latents, people=6)
    two = _drive(
        world, tmp_path / "two", launcher=_torchrun(2, "--master_port", str(_free_port())), **options
    )
    assert [(s["num_processes"], s["process_index"]) for s in two] == [(2, 0), (2, 1)]
    (folder,) = [p for p in latents.iterdir() if p.is_dir()]
    entries = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(entries) == 6 and (folder / "complete.json").is_file()
    made = [s["latents_made"] for s in two]
    assert sorted(made) == [3, 3], made  # half each: the people are split between the processes
    (one,) = _drive(world, tmp_path / "one", accumulation=2, **options)
    assert one["latents_made"] == 0
    rank0, single = _weights(tmp_path / "two", 0), _weights(tmp_path / "one", 0)
    moved = max((single[k] - _initial(k, single)).abs().max().item() for k in single)
    worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    assert moved > 1e-3 and worst <= 1e-5 * max(1.0, moved), (worst, moved)


_INITIAL: dict = {}


def _initial(key: str, like: dict) -> torch.Tensor:
    """The untrained starting weights (the same initialization the driver makes)."""
    if not _INITIAL:
        from harness.pretraining import tiny_base

        from pva.method.model import PVAModel

        pva = PVAModel.initialize_from(tiny_base().model, num_tokens=4, seed=0, encoder_depth=1)
        _INITIAL.update(pva.state_dict())
    return _INITIAL[key]


def test_two_machines_finish_a_run(world, tmp_path):
    """Two torchrun "nodes" on 127.0.0.1 (one process each), rendezvous over TCP."""
    port = str(_free_port())
    out = tmp_path / "nodes"
    commands = []
    for rank in (0, 1):
        launcher = _torchrun(
            1, "--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"
        )
        commands.append(
            subprocess.Popen(
                [*launcher, str(DRIVER), f"--world={world.root}", f"--out={out}", "--steps=2", "--batch=1"],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [c.communicate(timeout=600)[0] for c in commands]
    assert [c.returncode for c in commands] == [0, 0], "\n".join(log[-3000:] for log in logs)
    seen = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    assert [(s["num_processes"], s["process_index"]) for s in seen] == [(2, 0), (2, 1)]
    assert seen[0]["provenance"]["pretrained"]["machines"] == 2
    rank0, rank1 = _weights(out, 0), _weights(out, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(world, tmp_path):
    """Stopped right after the checkpoint of step 2, resumed with --resume latest: after step 4
    the weights (here the EMA export, so the moving average is restored too) are exactly those
    of a run that never stopped."""
    options = dict(batch=2, accumulation=2, checkpoint_every=2, ema_decay=0.9)
    straight = tmp_path / "straight"
    _drive(world, straight, steps=4, **options)
    stopped = tmp_path / "stopped"
    _drive(world, stopped, steps=2, **options)
    first_half = _weights(stopped, 0)
    (stopped / "rank-0.safetensors").unlink()
    (resumed,) = _drive(world, stopped, steps=4, resume="latest", **options)
    assert len(resumed["losses"]) == 4  # the history continues, it does not start over
    end, reference = _weights(stopped, 0), _weights(straight, 0)
    assert any(not torch.equal(first_half[k], end[k]) for k in end), "the resumed run did not train"
    for key in reference:
        assert torch.equal(end[key], reference[key]), key
    checkpoints = sorted(p.name for p in (stopped / "run" / "checkpoints").iterdir())
    assert checkpoints == ["latest.json", "step-0000002", "step-0000004"]


# -- bad input ---------------------------------------------------------------------------------
def test_resume_from_a_checkpoint_of_another_model_family_is_refused(world, tmp_path):
    from harness.models import tiny_model, tiny_vae
    from harness.pretraining import tiny_text_encoder

    from pva.method.model import PVAModel
    from pva.method.weights import save_pva
    from pva.pretraining.checkpoints import save_checkpoint
    from pva.pretraining.session import Base

    sd20 = PVAModel.initialize_from(tiny_model("sd20", in_channels=9), num_tokens=4, encoder_depth=1)
    save_checkpoint(
        tmp_path / "run",
        5,
        {
            "pva.safetensors": lambda p: save_pva(sd20, p, overwrite=True),
            "state.pt": lambda p: torch.save({}, p),
        },
        {"step": 5},
    )
    run = pretraining_run(world, tmp_path / "run")
    with pytest.raises(
        Exception, match=r"--resume: .*step-0000005 does not fit the base model: .*made for SD2.x"
    ):
        run(resume="latest")
    # and a resume without any finished checkpoint says so
    with pytest.raises(
        Exception, match=r"latest.json: missing; this output folder has no finished checkpoint"
    ):
        pretraining_run(world, tmp_path / "new")(resume="latest")
    # an SDXL text encoder's width cannot drive an SD1.5 base either (the --init path)
    base = Base(tiny_model("sd15", in_channels=9), tiny_vae(), tiny_text_encoder(), "tiny", "tiny")
    save_pva(sd20, tmp_path / "sd20.safetensors")
    with pytest.raises(Exception, match=r"--init: .*sd20.safetensors does not fit the base model"):
        pretraining_run(world, tmp_path / "init", base=base)(init=tmp_path / "sd20.safetensors")


def test_unwritable_output_and_faceless_people_are_explained(world, tmp_path):
    from pva.data.datasets import open_dataset
    from pva.data.preprocess import PreprocessSettings, load_faces, preprocess_dataset
    from pva.errors import PVAError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PVAError, match=r"output: cannot write to .*a-file/run"):
        pretraining_run(world, blocker / "run")()
    # folders whose photos hold no face: preprocessing counts them, training refuses plainly
    import numpy as np
    from PIL import Image

    root = tmp_path / "walls"
    for person in ("a", "b", "c"):
        for k in range(2):
            (root / person).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((64, 64, 3), 40 * k + 60, np.uint8)).save(root / person / f"{k}.png")
    dataset = open_dataset(root)
    report = preprocess_dataset(dataset, tmp_path / "cache", PreprocessSettings(facenet=world.facenet))
    assert (report.photos_without_face, report.people_usable) == (6, 0)
    from harness.pretraining import tiny_base

    from pva.launch import make_accelerator
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.run import pretrain

    with pytest.raises(PVAError, match="no person with at least 2 usable photos"):
        pretrain(
            PretrainingConfig(output_dir=tmp_path / "run", max_steps=1),
            tiny_base(),
            dataset,
            load_faces(tmp_path / "cache", dataset.people),
            make_accelerator(cpu=True),
        )


def test_a_failure_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    from pva.pretraining.checkpoints import find_checkpoint, save_checkpoint

    def good(path: Path) -> None:
        path.write_bytes(b"ok")

    files = {"pva.safetensors": good, "state.pt": good}
    save_checkpoint(tmp_path, 1, files, {"step": 1})

    def dies_half_way(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt  # the user pressed Ctrl-C while it was written

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {**files, "state.pt": dies_half_way}, {"step": 2})
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-0000001"]
    assert find_checkpoint(tmp_path, "latest").name == "step-0000001"
    # keep: only the newest checkpoints stay
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, files, {"step": step}, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-0000003", "step-0000004"]
    with pytest.raises(Exception, match="not a finished pretraining checkpoint .*meta.json"):
        (folder / "step-0000004" / "meta.json").unlink()
        find_checkpoint(tmp_path, str(folder / "step-0000004"))


# -- the command line, on a checkpoint file through ComfyUI's own loader -----------------------
@pytest.mark.slow
def test_command_line_pretrains_from_a_checkpoint_file(world, sd15_inpaint_ckpt, tmp_path):
    """scripts/pretrain.py on the full-size SD1.5-inpainting layout (random weights), loaded by
    ComfyUI's load_checkpoint_guess_config: one step, a checkpoint Load PVA Model accepts, a
    TensorBoard log, a validation grid."""
    from pva.method.model import PVAModel
    from pva.method.weights import load_pva, read_metadata

    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--checkpoint", str(sd15_inpaint_ckpt),
        "--data", str(world.data), "--cache", str(world.cache), "--output", str(out), "--max-steps", "1",
        "--batch-size", "1", "--gradient-accumulation", "1", "--time-bins", "1", "--resolution", "64",
        "--workers", "0", "--validation-samples", "2", "--preview-samples", "1", "--preview-steps", "2",
        "--checkpoint-every", "1", "--latents", "per-step",  # (the full-size VAE on 113 people: minutes)
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "144 people (120 train, 24 val, 0 test)" in done.stdout
    final = out / f"pva-{sd15_inpaint_ckpt.stem}-step1.safetensors"
    pva = load_pva(final)  # what Load PVA Model does with a file in models/pva
    assert isinstance(pva, PVAModel) and pva.family == "SD15" and pva.context_dim == 768
    provenance = json.loads(read_metadata(final)["provenance"])["pretrained"]
    assert (
        provenance["steps"] == 1
        and provenance["people"]
        == len(set(world.dataset().splits["train"]) & set(world.faces()))  # usable ones
        and provenance["base"] == sd15_inpaint_ckpt.name
    )
    assert (out / "checkpoints" / "step-0000001" / "pva.safetensors").is_file()
    assert (out / "samples" / "step-0000001.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    # bad input at the command line: a clear message and exit code 2, no traceback
    command[command.index("--data") + 1] = str(tmp_path / "nowhere")
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: dataset:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.test_models("world-base", "world-identity-model")
@pytest.mark.claims
def test_pretraining_learns_identity_on_people_it_never_saw(world, tmp_path):
    """Pretrained on 113 synthetic people (harness.pretraining.IDENTITY_RECIPE, cached), a PVA
    model reconstructs the faces of 24 people it never saw best from their own identity tokens:
    the held-out face-region loss with them is lower than with no tokens and lower than with
    another held-out person's. The same measurement on the untrained model is the control: its
    tokens say nothing about the person, so another person's serve as well as the right ones.

    Bounds from the spread over three independently seeded worlds (PVA_TEST_WORLD_SEED 0, 1, 2;
    96 held-out samples each, the same noise for all three kinds of tokens): no tokens / own
    1.023 .. 1.062 (bound 1.01); another person's / own 1.0033 .. 1.0072 (bound 1.0015); the
    untrained model's another person's / own within 0.00019 .. 0.00033 of 1 (bound 0.001). The
    identity-specific part is small (the tokens mostly help any face) but 10 to 20 times the
    untrained model's."""
    from harness.host import import_comfy_on_cpu
    from harness.pretraining import identity_config, identity_model, world_base

    import_comfy_on_cpu()
    from pva.launch import make_accelerator
    from pva.method.model import PVAModel
    from pva.method.weights import load_pva
    from pva.pretraining.validation import held_out_identity_gaps

    trained_file = identity_model(world)
    base, dataset, faces = world_base(world), world.dataset(), world.faces()
    config = identity_config(tmp_path)
    assert len([p for p in dataset.splits["val"] if p in faces]) >= 20
    assert len([p for p in dataset.splits["train"] if p in faces]) >= 100
    accelerator = make_accelerator(cpu=True)
    untrained = PVAModel.initialize_from(
        base.model, num_tokens=config.num_tokens, seed=config.seed, encoder_depth=config.encoder_depth
    )
    before = held_out_identity_gaps(config, base, dataset, faces, untrained, accelerator)
    after = held_out_identity_gaps(config, base, dataset, faces, load_pva(trained_file), accelerator)
    print(f"\n[identity] held-out face loss, untrained: {before}\n[identity] pretrained: {after}")
    assert after["none"] / after["own"] > 1.01, after
    assert after["other"] / after["own"] > 1.0015, after
    # the control: before pretraining, the right person's tokens are no better than another's
    assert abs(before["other"] / before["own"] - 1) < 0.001, before
    assert after["own"] < before["own"], (before, after)


@pytest.mark.test_models("sd15-inpainting-small-random")
def test_command_line_pretrains_from_separate_model_files(world, tmp_path):
    """The way Flux ships (diffusion model, text encoders, VAE in separate files), loaded by
    ComfyUI's own Load Diffusion Model, CLIP loader and Load VAE: here the small SD1.5-inpainting
    checkpoint taken apart into those three files. Bad combinations of options are refused."""
    from harness.checkpoints import sd15_inpaint_small_checkpoint
    from safetensors.torch import save_file

    from pva.method.weights import load_pva, read_metadata

    whole = load_file(str(sd15_inpaint_small_checkpoint()))
    parts = {"unet.safetensors": "model.diffusion_model.", "clip.safetensors": "cond_stage_model.transformer.", "vae.safetensors": "first_stage_model."}  # fmt: skip
    for name, prefix in parts.items():
        save_file(
            {k[len(prefix) :]: v for k, v in whole.items() if k.startswith(prefix)}, str(tmp_path / name)
        )
    del whole
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--diffusion-model", str(tmp_path / "unet.safetensors"),
        "--text-encoders", str(tmp_path / "clip.safetensors"), "--clip-type", "stable_diffusion",
        "--vae", str(tmp_path / "vae.safetensors"), "--data", str(world.data), "--cache", str(world.cache),
        "--output", str(out), "--max-steps", "1", "--batch-size", "1", "--gradient-accumulation", "1",
        "--time-bins", "1", "--resolution", "64", "--workers", "0", "--validation-samples", "2",
        "--preview-samples", "0", "--latents", "per-step",
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    final = out / "pva-unet-step1.safetensors"
    assert load_pva(final).family == "SD15"
    assert json.loads(read_metadata(final)["provenance"])["pretrained"]["base"] == "unet.safetensors"
    for drop, message in (("--vae", "--diffusion-model needs --text-encoders and --vae"),):
        at = command.index(drop)
        bad = command[:at] + command[at + 2 :]
        done = subprocess.run(bad, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    bad = [*command, "--checkpoint", str(tmp_path / "unet.safetensors")]
    done = subprocess.run(bad, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
