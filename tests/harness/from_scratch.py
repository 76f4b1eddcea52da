"""Personalization from scratch (no pretrained PVA model) on the synthetic world, measured on
photos held out from training: shared by the acceptance test and
bench/personalization_from_scratch.py.

The world's base (harness/pretraining.py) inpaints synthetic people whose identity is their face
tint; its held-out people were never seen by it. Text goes through the CLIP-L of the small
SD1.5-inpainting test checkpoint (random weights), PROMPT with the person token; what has no
trained token reads the same prompt with the token at its class word, so every method starts
from the same conditioning.
"""

from __future__ import annotations

import copy
import time

import torch

from pva.faces.detection import Faces, PhotoFaces
from pva.host.text import class_word_vectors, encode, tokenize_with_token
from pva.method.model import PVAModel
from pva.method.person_token import PersonToken
from pva.training.data import PersonalizationData, prepare_personalization_data
from pva.training.person_prompt import TokenPrompt
from pva.training.personalize import Personalizer, TrainingSettings, encode_inpaint_targets, training_data
from pva.training.session import training_mode

TOKEN = "test_person"
PROMPT = f"photo of embedding:{TOKEN} person"
TRAIN_PHOTOS = 3  # of each person's 4: the last one is held out
EVAL_BINS, EVAL_REPEATS = 8, 4
# Pictures: the held-out face inpainted as the evaluation harness samples the world (its held-out
# identity test): 20 ancestral steps, CFG 3, identity on the positive branch.
SAMPLE_STEPS, SAMPLE_CFG, SAMPLE_SEEDS = 20, 3.0, (0, 1, 2)


class FromScratchWorld:
    """The world's base and VAE, the CLIP, and the first `people` held-out people's photos."""

    def __init__(self, people: int):
        import comfy.sd

        from pva.faces.facenet import load_facenet

        from .checkpoints import sd15_inpaint_small_checkpoint
        from .pretraining import synthetic_world, world_base, world_vae

        self.world = synthetic_world()
        base = world_base(self.world)
        # world_vae: the encoder the base was trained with, and a decoder that paints faces a
        # recognizer can tell apart (the base's own decoder is random)
        self.model, self.vae = base.model, world_vae(self.world)
        with torch.inference_mode():
            _, self.clip, _, _ = comfy.sd.load_checkpoint_guess_config(
                str(sd15_inpaint_small_checkpoint()), output_vae=False, output_model=False
            )
        facenet = load_facenet(self.world.facenet)
        names = sorted(self.world.dataset().splits["val"])[:people]
        self.people = {name: self._person(name, facenet) for name in names}

    def _person(self, name: str, facenet) -> PersonalizationData:  # noqa: ANN001
        """All 4 photos (64 px crops, whole-face masks, FaceNet embeddings), the faces where the
        world's face cache found them."""
        cached = self.world.faces()[name]
        photos = {p.key: p for p in self.world.dataset().people[name].photos}
        images = [photos[key].read() for key in cached.keys]
        faces = Faces(
            tuple(PhotoFaces(h, w, (f,)) for (h, w), f in zip(cached.sizes, cached.faces, strict=True))
        )
        with torch.inference_mode(False):
            return prepare_personalization_data(images, facenet, resolution=64, faces=faces)

    def start_token(self) -> PersonToken:
        return PersonToken(TOKEN, class_word_vectors(self.clip, "person", 1), "person")

    def positive(self, token: PersonToken | None) -> list:
        vectors = (token or self.start_token()).tensors()
        return encode(self.clip, tokenize_with_token(self.clip, PROMPT, TOKEN, vectors))

    def negative(self) -> list:
        return encode(self.clip, self.clip.tokenize(""))

    def fresh_pva(self, seed: int) -> PVAModel:
        return PVAModel.initialize_from(self.model, num_tokens=4, seed=seed, encoder_depth=1)


def training_photos(data: PersonalizationData) -> PersonalizationData:
    n = TRAIN_PHOTOS
    return PersonalizationData(
        data.pixels[:n], data.masks[:n], data.embeddings[:n], data.flipped_embeddings[:n]
    )


def train(
    world: FromScratchWorld,
    start: PVAModel,
    token: PersonToken | None,
    data: PersonalizationData,
    settings: TrainingSettings,
    keep_at: list[int],
) -> dict[int, tuple[PVAModel, float]]:
    """Quick personalization as personalize() runs it (a token trains when given), with a copy
    of the PVA model kept after each of `keep_at` steps: {steps: (model, training seconds)}."""
    kept = {}
    with training_mode(), torch.random.fork_rng(devices=[]):
        trained = copy.deepcopy(start)
        prompt = None
        if token is not None:
            trained.person_token = copy.deepcopy(token)
            prompt = TokenPrompt(world.clip, PROMPT, trained.person_token)
        with torch.no_grad():
            positive = world.positive(token)
        torch.manual_seed(settings.seed)
        data = training_data(data, settings)
        targets = encode_inpaint_targets(data, world.vae, positive)
        with Personalizer(world.model, trained, data, targets, settings, prompt) as run:
            clock = {"spent": 0.0, "since": time.perf_counter()}

            def on_step(step: int, loss: float) -> None:
                if step + 1 in keep_at:
                    clock["spent"] += time.perf_counter() - clock["since"]
                    kept[step + 1] = (copy.deepcopy(trained).requires_grad_(False), clock["spent"])
                    clock["since"] = time.perf_counter()

            run.train(on_step)
    return kept


def held_out_loss(
    world: FromScratchWorld, model, pva: PVAModel, data: PersonalizationData, identity: bool
) -> float:  # noqa: ANN001
    """Face-region loss of the person's held-out (last) photo, the others its references, on
    fixed noise and timesteps; `identity` off: the identity path dropped (the base, a LoRA)."""
    with training_mode():
        targets = encode_inpaint_targets(data, world.vae, world.positive(pva.person_token))
        with Personalizer(model, pva, data, targets, TrainingSettings(time_bins=EVAL_BINS)) as run:
            return run.held_out_loss(
                data.count - 1, seed=4321, repeats=EVAL_REPEATS, face_only=True, identity=identity
            )


def held_out_pictures(
    world: FromScratchWorld, model, pva: PVAModel, data: PersonalizationData, identity: bool
) -> list[torch.Tensor]:  # noqa: ANN001
    """The person's held-out (last) photo with its face inpainted, one [R, R, 3] picture per
    SAMPLE_SEEDS, the other photos its references; `identity` off: the model alone."""
    from pva.host.inpainting import inpaint
    from pva.method.patching import apply_identity

    if identity:
        with torch.no_grad():
            tokens = pva.encode(data.references_for(data.count - 1))
        model = apply_identity(model, pva, tokens)
    with torch.no_grad():
        positive, negative = world.positive(pva.person_token), world.negative()
    last = data.count - 1
    return [
        inpaint(model, world.vae, positive, negative, data.pixels[last], data.masks[last], seed=seed,
                steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, sampler="euler_ancestral", scheduler="ddim_uniform")
        for seed in SAMPLE_SEEDS
    ]  # fmt: skip


class PictureScores:
    """What a recognizer says of pictures of a held-out photo: FaceNet (the world's calibrated
    weights: the features PVA is conditioned on) and dlib's ResNet (independent of PVA), the
    cosine of each picture's face to the ground truth's, with the face at the fixed crop the
    evaluation harness uses for aligned photos; and a quality figure, the structure error."""

    def __init__(self, world: FromScratchWorld):
        from pva.faces.facenet import load_facenet
        from pva.measure.recognition import FaceLocator, load_recognizer

        self.locator = FaceLocator(mode="aligned")
        self.recognizers = {
            "facenet": load_recognizer("facenet", load_facenet(world.world.facenet)),
            "dlib": load_recognizer("dlib"),
        }

    def __call__(self, pictures: list[torch.Tensor], data: PersonalizationData) -> dict[str, float]:
        from pva.measure.recognition import cosine, locate_and_embed

        truth, mask = data.pixels[data.count - 1], data.masks[data.count - 1]
        scores = {}
        for name, recognizer in self.recognizers.items():
            located = locate_and_embed(recognizer, [truth, *pictures], self.locator, "picture")
            reference, *features = located.features
            # a picture without a face scores 0, as in the evaluation harness (never here: fixed crop)
            values = [0.0 if f is None else float(cosine(f, reference[None])[0]) for f in features]
            scores[name] = sum(values) / len(values)
        scores["structure"] = sum(structure_error(p, truth, mask) for p in pictures) / len(pictures)
        return scores


def structure_error(picture: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error (0..1 pixels) in the face mask between a picture and the photo, each
    colour channel's mean in the mask removed first: identity in this world is the face's tint,
    so what is left is shape and sharpness, a quality figure that does not reward the tint.
    (No FID/KID here: their Inception weights cannot be fetched on this machine, and 6 pictures
    per method would not make a distribution.)"""
    inside = mask > 0.5

    def centred(image: torch.Tensor) -> torch.Tensor:
        pixels = image[inside]
        return pixels - pixels.mean(dim=0)

    return float((centred(picture) - centred(truth)).pow(2).mean())
