"""Pieces for pretraining tests: a tiny base of the real SD1.5-inpainting architecture, a
random-weight FaceNet that still tells faces apart, and synthetic people preprocessed through
the pack's real detection and embedding path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artefacts import artefact, ensure, world_seed
from .models import tiny_model, tiny_vae
from .synthetic_people import person_photos, write_people


def tiny_text_encoder(context_dim: int = 768, pooled_dim: int | None = None):  # noqa: ANN201
    """A deterministic stand-in for CLIP (or Flux's T5 + CLIP, with a pooled output): each caption
    gets its own fixed random context."""

    def encode(caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:7], "little")
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, 77, context_dim, generator=generator)
        return context, None if pooled_dim is None else torch.randn(1, pooled_dim, generator=generator)

    return encode


def tiny_base(model=None, seed: int = 0):  # noqa: ANN001, ANN201
    """pva.pretraining.run.Base around a tiny SD1.5-inpainting UNet (or `model`) and a tiny VAE."""
    from pva.pretraining.session import Base

    model = model if model is not None else tiny_model("sd15", in_channels=9, seed=seed)
    return Base(
        model, tiny_vae(), tiny_text_encoder(), name="tiny-sd15-inpainting", fingerprint=f"tiny:{seed}"
    )


def calibrated_facenet(path: Path, seed: int = 0, calibration_people: int = 16) -> Path:
    """A random-weight InceptionResnetV1 whose BatchNorm statistics are measured on synthetic
    faces, saved as .safetensors. With the default statistics (mean 0, variance 1) a random
    FaceNet maps every face to nearly the same direction (cosine 0.99999 between people); with
    measured ones its random features separate people (cosine ~0.8 within a person, ~0.2
    across portraits) while it remains an untrained network."""
    from facenet_pytorch import InceptionResnetV1

    from pva.faces.detection import DetectionSettings, align_faces, find_faces

    from .checkpoints import calibrate_batch_norm

    torch.manual_seed(seed)
    net = InceptionResnetV1()
    crops = []
    for person in range(calibration_people):
        for pixels in person_photos(person, 2, seed=10_000 + seed):
            photo = torch.from_numpy(pixels).float().div(255)[None]
            found = find_faces(photo, DetectionSettings(min_face_size=20))
            if found.count:
                crops.append(align_faces(photo, [found.photos[0].faces[0]]))
    calibrate_batch_norm(net, torch.cat(crops))
    state = {k: v.contiguous() for k, v in net.eval().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def synthetic_dataset(root: Path, people: int, photos: int, seed: int = 0) -> Path:
    return write_people(root, people, photos, seed=seed)


# -- the cached synthetic world ----------------------------------------------------------------
WORLD = dict(train=120, val=24, photos=4, seed=world_seed(0), facenet_seed=world_seed(0), version=2)
FIXED_TIME_NS = 1_700_000_000 * 10**9


class World:
    """A dataset of synthetic people, its face cache and the FaceNet that made it."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "people"
        self.cache = root / "faces"
        self.facenet = root / "facenet-calibrated.safetensors"

    def dataset(self):  # noqa: ANN201
        from pva.data.datasets import open_dataset

        return open_dataset(self.data)

    def faces(self):  # noqa: ANN201
        from pva.data.preprocess import load_faces

        return load_faces(self.cache, self.dataset().people)

    def training_samples(self, resolution: int, seed: int):  # noqa: ANN201
        """The pretraining samples (crop, mask, references) of the training people."""
        from pva.pretraining.samples import PretrainingSamples, SampleSettings

        dataset = self.dataset()
        return PretrainingSamples(
            dataset, self.faces(), dataset.splits["train"], SampleSettings(resolution=resolution), seed=seed
        )


@artefact("synthetic-people", WORLD, suffix="", slow=True)
def _build_world(root: Path) -> None:
    """The synthetic people (photos, split), their calibrated FaceNet and face cache (a folder)."""
    import json

    from pva.data.preprocess import PreprocessSettings, preprocess_dataset

    world = World(root)
    people = WORLD["train"] + WORLD["val"]
    write_people(world.data, people, WORLD["photos"], seed=WORLD["seed"])
    names = sorted(p.name for p in world.data.iterdir())
    split = {"train": names[: WORLD["train"]], "val": names[WORLD["train"] :], "test": []}
    (world.data / "split.json").write_text(json.dumps(split))
    for photo in world.data.rglob("*"):  # the face cache's fingerprint reads photo times
        os.utime(photo, ns=(FIXED_TIME_NS, FIXED_TIME_NS))
    calibrated_facenet(world.facenet, seed=WORLD["facenet_seed"])
    settings = PreprocessSettings(facenet=world.facenet, min_face_size=20, workers=2, threads=1)
    preprocess_dataset(world.dataset(), world.cache, settings)


def synthetic_world() -> World:
    """Built once (about a minute: every photo goes through MTCNN and FaceNet) and cached."""
    return World(ensure("synthetic-people"))


def _save_state(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def _load_state(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


# -- a base that already inpaints these people (but cannot know their skin tint) --------------
BASE_RECIPE = dict(
    steps=1500, batch=16, learning_rate=1e-3, resolution=64, pool=2048, seed=world_seed(123), version=2
)


def _world_base_model():  # noqa: ANN202
    return tiny_base(tiny_model("sd15", in_channels=9, seed=BASE_RECIPE["seed"]))


@artefact("world-base", BASE_RECIPE, needs=("synthetic-people",), slow=True)
def _build_world_base(path: Path) -> None:
    """The tiny SD1.5-inpainting UNet taught to inpaint the world's training people."""
    base = _world_base_model()
    _pretrain_base(base, synthetic_world())
    _save_state(base.model.model.diffusion_model, path)


def world_base(world: World | None = None):  # noqa: ANN201
    """tiny_base() after BASE_RECIPE's inpainting pretraining on the world's training people
    (cached). An identity can only help a model that already passes the noisy latent through
    (see harness/pretrained.py); trained like this, the base fills a masked face from its
    surroundings, and what it cannot know is the person's tint."""
    base = _world_base_model()
    _load_state(base.model.model.diffusion_model, ensure("world-base"))
    return base


@torch.no_grad()  # (grad mode is on outside ComfyUI's executor: the latents would keep the VAE's graph)
def _inpainting_pool(base, world: World) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Clean latents, inpainting inputs and text contexts of BASE_RECIPE['pool'] training samples."""
    from pva.host.conditioning import inpaint_conditioning
    from pva.pretraining.samples import SampleBatch

    from .pretrained import inpainting_input

    samples = world.training_samples(BASE_RECIPE["resolution"], BASE_RECIPE["seed"])
    model = base.model.model
    latents, concats, contexts = [], [], []
    for start in range(0, BASE_RECIPE["pool"], 64):
        batch = SampleBatch.of([samples[i] for i in range(start, start + 64)])
        context = torch.cat([base.encode_text(c)[0] for c in batch.captions])
        positive = [[context, {}]]
        cond, _, latent = inpaint_conditioning(positive, positive, batch.pixels, base.vae, batch.mask)
        x0 = model.process_latent_in(latent["samples"])
        latents.append(x0)
        concats.append(inpainting_input(model, cond, x0))
        contexts.append(context)
    return torch.cat(latents), torch.cat(concats), torch.cat(contexts)


def _pretrain_base(base, world: World) -> None:  # noqa: ANN001
    from .pretrained import train_denoiser

    latents, concats, contexts = _inpainting_pool(base, world)
    train_denoiser(base.model.model, latents, concats, lambda pick: contexts[pick], BASE_RECIPE)


# -- a PVA model pretrained on the world's training people -------------------------------------
# Whole-face masks (the region the identity decides), projections and encoder at 1e-3: measured
# on the 24 held-out people, the face loss with their own tokens ends 7% below no tokens and 1%
# below another person's (0.0542 / 0.0580 / 0.0548 after 1500 steps; 0.5% and 0.2% after 250).
IDENTITY_RECIPE = dict(
    steps=1500, batch=8, learning_rate=1e-3, encoder_learning_rate=1e-3, regions=["whole face"],
    tokens=4, depth=2, resolution=64, time_bins=4, seed=world_seed(0), version=2,
)  # fmt: skip


def identity_config(output_dir: Path, validation_samples: int = 96):  # noqa: ANN201
    """The pretraining configuration of IDENTITY_RECIPE (the held-out validation uses it too)."""
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.samples import SampleSettings

    recipe = IDENTITY_RECIPE
    return PretrainingConfig(
        output_dir=output_dir,
        max_steps=recipe["steps"],
        batch_size=recipe["batch"],
        gradient_accumulation=1,
        time_bins=recipe["time_bins"],
        learning_rate=recipe["learning_rate"],
        scale_lr=False,
        encoder_learning_rate=recipe["encoder_learning_rate"],
        encoder_dropout=0.0,
        checkpoint_every=10**9,
        validate_every=10**9,
        validation_samples=validation_samples,
        preview_samples=0,
        num_tokens=recipe["tokens"],
        encoder_depth=recipe["depth"],
        loader_workers=0,
        seed=recipe["seed"],
        samples=SampleSettings(resolution=recipe["resolution"], regions=tuple(recipe["regions"])),
        latents="per-step",  # as the recorded model was made (before the latent cache)
    )


@artefact("world-identity-model", IDENTITY_RECIPE, needs=("synthetic-people", "world-base"), slow=True)
def _build_identity_model(path: Path) -> None:
    """A PVA model pretrained on the world's training people (IDENTITY_RECIPE)."""
    import tempfile

    from pva.launch import make_accelerator
    from pva.method.weights import save_pva
    from pva.pretraining.run import pretrain

    world = synthetic_world()
    with tempfile.TemporaryDirectory() as run:
        config = identity_config(Path(run))
        result = pretrain(config, world_base(), world.dataset(), world.faces(), make_accelerator(cpu=True))
    # the run's folders are this machine's: the file records the world by name
    result.pva.provenance["pretrained"]["dataset"] = "synthetic-people"
    save_pva(result.pva, path, overwrite=True)


def identity_model(world: World | None = None) -> Path:
    """The PVA file IDENTITY_RECIPE pretrains from world_base on the world's training people
    (cached; about 10 minutes on one core)."""
    return ensure("world-identity-model")


# -- a VAE whose decoder gives back the faces its (random) encoder saw ---------------------------
# world_base and identity_model were trained on the latents of tiny_vae()'s random encoder; its
# random decoder paints noise, so no recognizer could tell who a generated face is. Training the
# decoder alone to invert that encoder keeps both models valid and makes their pictures
# measurable (blurry at 64 px, face colours kept). Measured on 128 held-out faces (mean squared
# error on -1..1 pixels): 0.132 after 800 steps of 8, as after 1200 of 16 (a third of the time);
# 0.165 after 400 of 8.
DECODER_RECIPE = dict(
    steps=800, batch=8, learning_rate=1e-3, pool=1024, resolution=64, seed=world_seed(5), version=2
)


@artefact("world-decoder", DECODER_RECIPE, needs=("synthetic-people",), slow=True)
def _build_world_decoder(path: Path) -> None:
    """tiny_vae() with its decoder trained to invert its random encoder on the world's faces."""
    autoencoder = tiny_vae().first_stage_model
    _train_decoder(autoencoder, synthetic_world())
    _save_state(autoencoder, path)


def world_vae(world: World | None = None):  # noqa: ANN201
    """tiny_vae() (the encoder world_base was trained with) with a decoder trained on the
    world's training faces (cached)."""
    vae = tiny_vae()
    _load_state(vae.first_stage_model, ensure("world-decoder"))
    return vae


def _train_decoder(autoencoder: torch.nn.Module, world: World) -> None:
    recipe = DECODER_RECIPE
    samples = world.training_samples(recipe["resolution"], recipe["seed"])
    with torch.no_grad():
        pixels = torch.stack([samples[i].pixels for i in range(recipe["pool"])]).permute(0, 3, 1, 2) * 2 - 1
        latents = torch.cat([autoencoder.encode(chunk) for chunk in pixels.split(64)])
    parameters = [*autoencoder.post_quant_conv.parameters(), *autoencoder.decoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=recipe["learning_rate"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    with torch.inference_mode(False), torch.enable_grad():
        for parameter in parameters:
            parameter.requires_grad_(True)
        for _ in range(recipe["steps"]):
            pick = torch.randint(len(latents), (recipe["batch"],), generator=generator)
            loss = (autoencoder.decode(latents[pick]) - pixels[pick]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for parameter in parameters:
            parameter.requires_grad_(False)


def pretraining_run(world: World, output: Path, base=None, **overrides):  # noqa: ANN001, ANN201
    """A callable running pretrain() in this process on the world with the tiny base: one step,
    batch 1, 64 px (`overrides` change the configuration; its keyword arguments go to pretrain)."""
    from pva.launch import make_accelerator
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.run import pretrain
    from pva.pretraining.samples import SampleSettings

    settings = dict(
        output_dir=output, max_steps=1, batch_size=1, gradient_accumulation=1, time_bins=1, num_tokens=4,
        encoder_depth=1, loader_workers=0, validation_samples=2, preview_samples=0, samples=SampleSettings(resolution=64),
        latents="per-step",  # (tests of the latent cache ask for it, on fewer people)
        latents_dir=output / "latents",  # never into the world's face cache (a recorded artefact)
    )  # fmt: skip
    config = PretrainingConfig(**{**settings, **overrides})

    def run(**kwargs):  # noqa: ANN003, ANN202
        accelerator = make_accelerator(cpu=True)
        return pretrain(config, base or tiny_base(), world.dataset(), world.faces(), accelerator, **kwargs)

    return run
