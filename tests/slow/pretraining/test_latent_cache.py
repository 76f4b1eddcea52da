"""The pretraining latent cache (pva/pretraining/latent_cache.py): a cached sample gives the batch
its photo gives through ComfyUI's InpaintModelConditioning, a change of VAE or crop settings
makes new latents, a corrupt latent is never trained on and is made again, and processes share
the building of one cache. On the tests' synthetic people with the tiny SD1.5-inpainting base."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.training, pytest.mark.test_models("synthetic-people")]

PEOPLE = 5  # training people the cache is built for (the world's first)
VIEWS, MASKS = 2, 3


@pytest.fixture(scope="module")
def world():
    from harness.host import import_comfy_on_cpu
    from harness.pretraining import synthetic_world

    import_comfy_on_cpu()
    return synthetic_world()


@pytest.fixture(scope="module")
def parts(world):
    from harness.pretraining import tiny_base

    from pva.pretraining.samples import PretrainingSamples, SampleSettings

    dataset = world.dataset()
    people = dataset.splits["train"][:PEOPLE]
    samples = PretrainingSamples(dataset, world.faces(), people, SampleSettings(resolution=64), seed=3)
    return tiny_base(), samples


def _cache(base, samples, root: Path, vae=None, views=VIEWS, masks=MASKS):  # noqa: ANN001, ANN202
    from pva.pretraining.latent_cache import LatentCache

    return LatentCache.for_run(root, vae or base.vae, samples, views, masks, inpainting=True)


def _built(base, samples, root: Path):  # noqa: ANN001, ANN202
    from pva.launch import make_accelerator
    from pva.pretraining.latent_cache import build_latent_cache

    cache = _cache(base, samples, root)
    made = build_latent_cache(cache, samples, base.vae, make_accelerator(cpu=True))
    return cache, made


def _with(samples, cache):  # noqa: ANN001, ANN202
    """The same samples reading `cache` (None: every sample from its photo)."""
    from pva.pretraining.samples import PretrainingSamples

    out = PretrainingSamples.__new__(PretrainingSamples)
    out.__dict__.update(samples.__dict__, latents=cache)
    return out


def _fp16_bound(reference: torch.Tensor) -> float:
    """Half a float16 step at the tensor's largest magnitude: what storing it costs."""
    return reference.abs().max().item() * 2.0**-11 * 1.01


def test_a_cached_sample_gives_the_batch_its_photo_gives(parts, tmp_path):
    """Each cached (photo, view, mask) unit holds what ComfyUI's InpaintModelConditioning makes of
    that view's crop and mask (to float16 rounding), and a batch prepared from cached samples
    equals the batch prepared from the same crops and masks through the VAE. Control: another
    view's latents differ from this view's by far more than the rounding."""
    from harness.pretraining import tiny_text_encoder

    from pva.data.text_cache import TextCache
    from pva.host.conditioning import inpaint_conditioning
    from pva.method.model import PVAModel
    from pva.pretraining.config import PretrainingConfig
    from pva.pretraining.samples import TEMPLATES, SampleBatch
    from pva.pretraining.session import PretrainingSession
    from pva.training.session import training_mode

    base, samples = parts
    cache, made = _built(base, samples, tmp_path)
    assert made == PEOPLE
    person = samples.faces[samples.people[1]]
    pixels = samples.photos[person.keys[2]].read()
    for view in range(VIEWS):
        crop, masks = samples.view(person, 2, pixels, view, MASKS)
        for which in range(MASKS):
            unit = cache.read(person.name, 2, view, which)
            assert torch.equal(unit.mask, masks[which])
            positive = [[torch.zeros(1, 77, 768), {}]]  # (ComfyUI's InpaintModelConditioning)
            cond, _, latent = inpaint_conditioning(positive, [], crop[None], base.vae, masks[which][None])
            target, grey = latent["samples"][0], cond[0][1]["concat_latent_image"][0]
            assert (unit.latent - target).abs().max() <= _fp16_bound(target)
            assert (unit.masked - grey).abs().max() <= _fp16_bound(grey)
    other_view = cache.read(person.name, 2, 1, 0).latent - cache.read(person.name, 2, 0, 0).latent
    assert other_view.abs().max() > 100 * _fp16_bound(target)

    # the whole prepared batch: cached samples vs the same views made from their photos
    cached_samples, photo_samples = _with(samples, cache), _with(samples, None)
    items = [cached_samples[i] for i in range(4)]
    assert all(s.latents is not None and s.pixels is None for s in items)
    from_photos = []
    for index, item in enumerate(items):
        rng = cached_samples.rng(index)
        chosen = cached_samples.faces[cached_samples.people[rng.randrange(len(cached_samples.people))]]
        target_index = rng.randrange(len(chosen))
        view, which = rng.randrange(VIEWS), rng.randrange(MASKS)
        crop, masks = photo_samples.view(
            chosen, target_index, samples.photos[chosen.keys[target_index]].read(), view, MASKS
        )
        from_photos.append(replace(item, pixels=crop, mask=masks[which], latents=None))
        assert torch.equal(item.mask, masks[which])
    config = PretrainingConfig(output_dir=tmp_path, batch_size=4, time_bins=2, num_tokens=4, encoder_depth=1)
    texts = TextCache.build(tmp_path / "text.safetensors", TEMPLATES, tiny_text_encoder())
    with training_mode():
        pva = PVAModel.initialize_from(base.model, num_tokens=4, seed=0, encoder_depth=1)
        with PretrainingSession(base, pva, config, texts) as session:
            cached = session.prepare(SampleBatch.of(items)).training
            direct = session.prepare(SampleBatch.of(from_photos)).training
    assert torch.equal(cached.sigmas, direct.sigmas) and torch.equal(cached.noise, direct.noise)
    assert (cached.x0 - direct.x0).abs().max() <= _fp16_bound(direct.x0)
    (cached_cond,), (direct_cond,) = cached.conds, direct.conds
    concat, concat_direct = (
        cached_cond["model_conds"]["c_concat"].cond,
        direct_cond["model_conds"]["c_concat"].cond,
    )
    assert concat.shape == concat_direct.shape
    assert (concat - concat_direct).abs().max() <= _fp16_bound(concat_direct)


def test_another_vae_or_crop_setting_makes_new_latents_and_changed_faces_remake_their_entry(
    parts, tmp_path, monkeypatch
):
    """The fingerprint follows the VAE's weights and the settings that shape crops and masks; a
    person whose detected faces changed gets their entry made again, and only they; a finished
    folder is trusted without opening every file."""
    from harness.models import tiny_vae

    from pva.data.preprocess import PersonFaces
    from pva.launch import make_accelerator
    from pva.pretraining import latent_cache
    from pva.pretraining.latent_cache import build_latent_cache

    base, samples = parts
    same = _cache(base, samples, tmp_path).fingerprint
    assert same == _cache(base, samples, tmp_path).fingerprint
    changed = {
        "another VAE": _cache(base, samples, tmp_path, vae=tiny_vae(seed=1)),
        "resolution": _cache(base, _with_settings(samples, resolution=72), tmp_path),
        "crop context": _cache(base, _with_settings(samples, context=(2.0, 2.2)), tmp_path),
        "regions": _cache(base, _with_settings(samples, regions=("whole face",)), tmp_path),
        "views": _cache(base, samples, tmp_path, views=3),
        "masks": _cache(base, samples, tmp_path, masks=1),
        "seed": _cache(base, _with_settings(samples, seed=4), tmp_path),
    }  # fmt: skip
    for what, cache in changed.items():
        assert cache.fingerprint != same, f"{what} did not change the fingerprint"

    cache, made = _built(base, samples, tmp_path)
    assert made == PEOPLE
    before = {p: cache.path(p).read_bytes() for p in samples.people}
    moved = samples.people[2]
    person = samples.faces[moved]
    # detected again (another box), so its face-cache file is another file
    shifted = tuple(replace(f, box=(f.box[0] + 3, *f.box[1:])) for f in person.faces)
    copy = tmp_path / "faces" / person.path.name
    copy.parent.mkdir()
    shutil.copyfile(person.path, copy)
    redone = PersonFaces(moved, person.keys, shifted, person.sizes, person.embeddings, person.mirrored, copy)
    faces = dict(samples.faces, **{moved: redone})
    again = _with(samples, cache)
    again.faces = faces
    assert build_latent_cache(cache, again, base.vae, make_accelerator(cpu=True)) == 1
    after = {p: cache.path(p).read_bytes() for p in samples.people}
    assert [p for p in samples.people if after[p] != before[p]] == [moved]

    # complete: no file is opened at the next start
    monkeypatch.setattr(latent_cache.LatentCache, "is_current", _never)
    assert build_latent_cache(cache, again, base.vae, make_accelerator(cpu=True)) == 0


def _never(*args):  # noqa: ANN002, ANN202
    raise AssertionError("a complete cache's files were opened at start-up")


def _with_settings(samples, seed: int | None = None, **changes):  # noqa: ANN001, ANN003, ANN202
    out = _with(samples, None)
    out.settings = replace(samples.settings, **changes)
    out.seed = samples.seed if seed is None else seed
    return out


def _corrupt_unit(path: Path, tensor: str, unit: int) -> None:
    """Flip one byte inside unit number `unit` (flat over the leading axes) of a stored tensor."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    begin, end = header[tensor]["data_offsets"]
    units = 1
    for size in header[tensor]["shape"][:2]:
        units *= size
    position = 8 + length + begin + (end - begin) // units * unit + 5
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_corrupt_cached_latent_is_never_trained_on_and_is_made_again(parts, tmp_path, capsys):
    """A flipped byte in one cached latent fails its checksum: the sample is made from the photo
    (the same view and mask), the file is set aside, and the next build makes it again, equal to
    the file before the damage. A truncated file is caught the same way."""
    base, samples = parts
    cache, _ = _built(base, samples, tmp_path)
    reader = _with(samples, cache)
    index = next(i for i in range(200) if reader[i].person == samples.people[0])
    rng = reader.rng(index)
    person = reader.faces[reader.people[rng.randrange(len(reader.people))]]
    photo = rng.randrange(len(person))
    view = rng.randrange(VIEWS)
    good_file = cache.path(person.name).read_bytes()
    good = reader[index]
    assert good.latents is not None

    _corrupt_unit(cache.path(person.name), "latents", photo * VIEWS + view)
    damaged = reader[index]
    assert damaged.latents is None and damaged.pixels is not None
    crop, masks = reader.view(person, photo, samples.photos[person.keys[photo]].read(), view, MASKS)
    assert torch.equal(damaged.pixels, crop) and torch.equal(damaged.mask, good.mask)
    assert not cache.path(person.name).exists() and cache.path(person.name).with_suffix(".damaged").exists()
    assert "fails its checksum" in capsys.readouterr().out
    assert not (cache.folder / "complete.json").exists()

    _, made = _built(base, samples, tmp_path)
    assert made == 1 and cache.path(person.name).read_bytes() == good_file
    assert not cache.path(person.name).with_suffix(".damaged").exists()
    assert torch.equal(reader[index].latents.latent, good.latents.latent)

    # a truncated file
    cache.path(person.name).write_bytes(good_file[: len(good_file) // 2])
    assert reader[index].latents is None
    _, made = _built(base, samples, tmp_path)
    assert made == 1 and cache.path(person.name).read_bytes() == good_file


def test_an_unwritable_latents_folder_is_named_before_any_work(parts, tmp_path):
    from pva.errors import PVAError

    base, samples = parts
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PVAError, match=r"latents_dir \(--latents-dir.*cannot write"):
        _built(base, samples, blocker / "latents")
