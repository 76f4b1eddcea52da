"""The person token of the from-scratch recipe, on the SD1.5-inpainting layout's real CLIP-L
(random weights): it is read exactly as ComfyUI reads a textual-inversion file, it trains
through the text encoder without changing it, it travels in the PVA file and to
models/embeddings, and bad input is named."""

import copy

import pytest
import torch
from harness.models import tiny_vae
from harness.people import synthetic_person

from pva.errors import PVAError, PVAWeightsError
from pva.host.text import class_word_vectors, encode, tokenize_with_token
from pva.method.model import PVAModel
from pva.method.person_token import PersonToken
from pva.method.weights import load_pva, save_embedding, save_pva
from pva.training.person_prompt import TokenPrompt
from pva.training.personalize import TrainingSettings, personalize
from pva.training.recipe import resolve_recipe

pytestmark = [pytest.mark.slow, pytest.mark.test_models("sd15-inpainting-small-random")]
PROMPT = "photo of embedding:anna_pva person"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def checkpoint(embeddings):
    """(MODEL, CLIP) of the small SD1.5-inpainting checkpoint; the CLIP reads embeddings from
    a folder of the test's own, as ComfyUI's reads models/embeddings."""
    import comfy.sd
    from harness.checkpoints import sd15_inpaint_small_checkpoint

    with torch.inference_mode():  # as ComfyUI's executor loads it
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(sd15_inpaint_small_checkpoint()), output_vae=False, embedding_directory=[str(embeddings)]
        )
    return model, clip


def a_token(clip, name="anna_pva", count=2, seed=0) -> PersonToken:
    token = PersonToken(name, class_word_vectors(clip, "person", count), "person")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # distinct rows, as after training
        for vectors in token.vectors.values():
            vectors += 0.02 * torch.randn(vectors.shape, generator=generator)
    return token


def test_a_prompt_with_the_token_encodes_exactly_as_comfyui_reads_its_embedding_file(checkpoint, embeddings):
    """Two mentions, one of them weighted: the encoding from memory equals CLIPTextEncode's
    after the token is saved to the embeddings folder, bit for bit; another token's vectors
    (the negative control) give another encoding."""
    _, clip = checkpoint
    token = a_token(clip)
    prompt = "photo of (embedding:anna_pva:1.2) person, embedding:anna_pva smiling"
    ours = encode(clip, tokenize_with_token(clip, prompt, token.name, token.tensors()))
    save_embedding(token, [str(embeddings)], overwrite=True)
    comfy_reads = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    assert torch.equal(ours[0][0], comfy_reads[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], comfy_reads[0][1]["pooled_output"])
    other = a_token(clip, seed=1)
    control = encode(clip, tokenize_with_token(clip, prompt, other.name, other.tensors()))
    assert (control[0][0] - ours[0][0]).abs().max() > 0.01


def test_the_token_trains_through_the_text_encoder_and_leaves_it_and_the_unet_unchanged(checkpoint):
    """20 steps of the token recipe: the loss falls, the token moves away from its class word
    (and only the token's rows differ in the prompt's encoding), the CLIP and the UNet keep
    their weights and the CLIP encodes as before. Freezing the token (the break the acceptance
    test names) leaves it where it started."""
    model, clip = checkpoint
    person = synthetic_person((0.9, 0.2, 0.2), seed=1)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    start = a_token(clip, count=1)
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    plain_before = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a person"))[0][0]
    settings = TrainingSettings(steps=20, learning_rate=1e-3, time_bins=2, token_learning_rate=1e-2)
    result = personalize(
        model, tiny_vae(), None, person, pva, settings, prompt=TokenPrompt(clip, PROMPT, start)
    )
    moved = (result.pva.person_token.vectors["clip_l"] - start.vectors["clip_l"]).norm() / start.vectors[
        "clip_l"
    ].norm()
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    print(f"\n[person token] moved {moved:.4f} of its norm; loss {first:.4f} -> {last:.4f}")
    assert moved > 0.05, moved
    assert last < first, result.losses
    assert pva.person_token is None and torch.equal(
        start.vectors["clip_l"], a_token(clip, count=1).vectors["clip_l"]
    )
    for key, value in clip.cond_stage_model.state_dict().items():
        assert torch.equal(value, clip_before[key]), key
    for key, value in model.model.diffusion_model.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    plain_after = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a person"))[0][0]
    assert torch.equal(plain_before, plain_after)

    frozen = TrainingSettings(steps=3, learning_rate=1e-3, time_bins=2, token_learning_rate=1e-30)
    still = personalize(model, tiny_vae(), None, person, pva, frozen, prompt=TokenPrompt(clip, PROMPT, start))
    assert torch.allclose(still.pva.person_token.vectors["clip_l"], start.vectors["clip_l"], atol=1e-12)


def test_token_only_trains_the_word_alone_with_the_identity_path_off(checkpoint):
    """The textual-inversion control of the bench: the PVA parameters keep their values, the
    token moves, and its loss is the base model's (identity dropped) at every step: the same
    losses whatever the identity encoder holds (a scrambled encoder is the control). Without a
    prompt there is nothing to train, and that is named."""
    from pva.training.personalize import TOKEN_ONLY

    model, clip = checkpoint
    person = synthetic_person((0.2, 0.7, 0.3), seed=2)
    settings = TrainingSettings(steps=4, learning_rate=1e-3, time_bins=2, train=TOKEN_ONLY)
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    scrambled = copy.deepcopy(pva)
    with torch.no_grad():
        for parameter in scrambled.identity_encoder.parameters():
            parameter.add_(torch.randn_like(parameter))
    results = [
        personalize(
            model, tiny_vae(), None, person, p, settings, prompt=TokenPrompt(clip, PROMPT, a_token(clip))
        )
        for p in (pva, scrambled)
    ]
    for key, value in results[0].pva.state_dict().items():
        if not key.startswith("person_token"):
            assert torch.equal(value, pva.state_dict()[key]), key
    assert not torch.equal(results[0].pva.person_token.vectors["clip_l"], a_token(clip).vectors["clip_l"])
    assert results[0].losses == results[1].losses
    both = personalize(
        model, tiny_vae(), None, person, scrambled, TrainingSettings(steps=4, learning_rate=1e-3, time_bins=2),
        prompt=TokenPrompt(clip, PROMPT, a_token(clip)),
    )  # fmt: skip
    assert both.losses[0] != results[1].losses[0]  # with the identity on, the encoder does matter
    with pytest.raises(PVAError, match="person token only"):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a person"))
        personalize(model, tiny_vae(), positive, person, pva, settings)


def test_the_token_travels_in_the_pva_file_and_only_such_files_are_version_2(checkpoint, tmp_path):
    model, clip = checkpoint
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    plain = load_pva(save_pva(pva, tmp_path / "plain.safetensors"))
    assert plain.person_token is None
    from pva.method.weights import read_metadata

    assert read_metadata(tmp_path / "plain.safetensors")["format_version"] == "1"
    pva.person_token = a_token(clip)
    back = load_pva(save_pva(pva, tmp_path / "anna.safetensors"))
    assert read_metadata(tmp_path / "anna.safetensors")["format_version"] == "2"
    assert back.person_token.name == "anna_pva" and back.person_token.class_word == "person"
    assert torch.equal(back.person_token.vectors["clip_l"], pva.person_token.vectors["clip_l"])
    assert "embedding:anna_pva" in back.describe()


def test_bad_input_is_named(checkpoint, tmp_path):
    model, clip = checkpoint
    pva = PVAModel.initialize_from(model, num_tokens=4, seed=0, encoder_depth=1)
    with pytest.raises(PVAError, match=r"person_token: 'person' is already a word CLIP knows.*person_pva"):
        TokenPrompt(clip, "photo of embedding:person", a_token(clip, name="person"))
    with pytest.raises(
        PVAError, match=r"prompt: it does not contain the person token; write embedding:anna_pva"
    ):
        TokenPrompt(clip, "photo of a person", a_token(clip))
    with pytest.raises(PVAError, match=r"person_token: 'a b' cannot name a token"):
        PersonToken("a b", {"clip_l": torch.zeros(1, 768)})
    with pytest.raises(PVAError, match=r"class_word: 'young woman' is 2 tokens"):
        class_word_vectors(clip, "young woman", 1)
    # auto on a never-pretrained model asks for a token; 'PVA only' refuses one
    with pytest.raises(PVAError, match=r"person_token: .*auto: this PVA model was never pretrained.*name it"):
        resolve_recipe("auto", pva, "")
    assert resolve_recipe("auto", pva, "anna_pva")[0] is True
    with pytest.raises(PVAError, match=r"person_token: the 'PVA only' recipe trains no token"):
        resolve_recipe("PVA only", pva, "anna_pva")
    pretrained = copy.deepcopy(pva)
    pretrained.provenance["pretrained"] = {"steps": 1}
    assert resolve_recipe("auto", pretrained, "") == (
        False,
        "recipe PVA only (auto: the PVA model was pretrained).",
    )
    # someone else's embedding of that name is never replaced
    foreign = tmp_path / "anna_pva.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, foreign)
    with pytest.raises(PVAWeightsError, match=r"person_token: models/embeddings already has anna_pva.pt"):
        save_embedding(a_token(clip), [str(tmp_path)], overwrite=True)
    assert foreign.read_bytes()  # untouched
