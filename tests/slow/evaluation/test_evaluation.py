"""The evaluation harness end to end on a tiny synthetic test split (two people of four aligned
face photos each, 64 px), through ComfyUI as a library: in-memory models (a tiny SD1.5-inpainting
UNet of the real architecture, a tiny VAE, random text conditioning, a PVA model initialized from
the UNet, random FaceNet), every method, every mask type, an edit prompt, and every instrument
(dlib, an ONNX recognizer, FaceNet, a small feature network for FID/KID, a tiny CLIP).

Checked: report.md has the paper's table with the paper's rows quoted beside ours, and its
numbers are report.json's; those numbers are what the recognizers and metrics give on the saved
pictures; outside the mask every result is the photo; PVA changes what is painted inside (and
personalization changes it again); a stopped run resumes, regenerating exactly the missing
pictures bit for bit; a run folder made with other settings is refused; bad datasets are named.
The multi-process test runs scripts/evaluate on a checkpoint file under torchrun and checks that
two processes paint exactly what one does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.checkpoints import facenet_random_weights
from harness.host import REPO_ROOT
from harness.models import text_conditioning, tiny_model, tiny_vae
from harness.synthetic_faces import write_synthetic_split
from harness.tiny_models import export_onnx, tiny_arcface, tiny_clip
from PIL import Image

from pva.data.datasets import open_dataset
from pva.errors import PVAError, PVAWeightsError
from pva.evaluation import EvaluationModels, EvaluationSettings, MetricTools, evaluate, load_models
from pva.faces.facenet import load_facenet
from pva.measure.clip_score import ClipScorer
from pva.measure.image_metrics import fid, image_features
from pva.measure.recognition import FaceLocator, load_recognizer, locate_and_embed
from pva.measure.recognition.base import cosine
from pva.method.model import PVAModel

pytestmark = pytest.mark.pipeline

SETTINGS = EvaluationSettings(
    faces="aligned", resolution=64, steps=2, references=2, personalization_steps=2, edits=("smiling",), seed=7
)


def features_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
    ).eval()
    return lambda x: net(x.float() / 255)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    data = write_synthetic_split(root / "data", people=2, photos=4, size=64)
    model = tiny_model("sd15", in_channels=9)
    facenet = load_facenet(facenet_random_weights())
    models = EvaluationModels(
        model=model,
        vae=tiny_vae(),
        encode_text=lambda prompt: text_conditioning(model, seed=len(prompt)),  # a different one per prompt
        pva=PVAModel.initialize_from(model, seed=0),
        facenet=facenet,
        description={"models": "tiny test models"},
    )
    onnx = export_onnx(tiny_arcface(seed=2), root / "tiny-arcface.onnx")
    tools = MetricTools(
        [load_recognizer("facenet", facenet), load_recognizer("dlib"), load_recognizer(f"onnx:{onnx}")],
        features=features_net(),
        features_name="tiny conv features",
        clip=ClipScorer(tiny_clip(root / "clip")),
    )
    out = root / "run"
    report = evaluate(data, models, out, SETTINGS, tools)
    return {"root": root, "data": data, "models": models, "tools": tools, "out": out, "report": report}


def pictures(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*.png"))
        if p.name != "grid.png"
    }


def load(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)


def test_report_has_the_papers_table_with_the_papers_rows(setup):
    out, report = setup["out"], setup["report"]
    text = (out / "report.md").read_text()
    print("\n" + text)
    assert (out / "report.json").is_file() and json.loads((out / "report.json").read_text())["targets"] == 4
    assert "| method | fine-tune time | ID sim (↑) | FID (↓) | KID x 1000 (↓) |" in text
    # the paper's Table 1 as published (not the module's own copy of it: a typo there must fail)
    for row in (
        "| paper: Latent Diffusion | - | 0.359 | 8.24 | 2.717 |",
        "| paper: Paint by Example | - | 0.430 | 11.2 | 6.089 |",
        "| paper: MyStyle | ~15 min | 0.696 | 27.7 | 5.029 |",
        "| paper: Textual Inversion | ~6 h | 0.644 | 13.8 | 8.404 |",
        "| paper: Custom Diffusion | ~3 h | 0.729 | 13.9 | 5.870 |",
        "| paper: PVA | ~1 min | 0.741 | 8.22 | 4.289 |",
    ):
        assert row in text, row
    # the headline is the first independent recognizer (FaceNet was listed first)
    assert report["headline_recognizer"] == "dlib"
    for method in SETTINGS.methods:
        identity = report["identity"]["dlib"]["methods"][method]["mean"]
        quality = report["quality"][method]
        row = next(
            line
            for line in text.splitlines()
            if line.startswith("| **ours:") and f"{method_label(method)}**" in line
        )
        assert f"| {identity:.3f} | {quality['mean_fid']:.2f} | {quality['mean_kid']:.3f} |" in row, row
    assert re.search(r"\| \*\*ours: PVA personalized\*\* \| \d+ s per identity \(cpu\) \|", text)
    assert "CLIP score" in text and "smiling" in text and "not independent" in text
    assert "Sampling: ComfyUI euler_ancestral / ddim_uniform, 2 steps, CFG 6.0" in text
    for recognizer in ("facenet", "dlib", f"onnx:{Path(setup['tools'].recognizers[2].name[5:]).name}"):
        assert recognizer in report["identity"]
    with Image.open(out / "grid.png") as grid:  # 8 rows of references / input / 3 results / ground truth
        assert grid.size == (150 + 128 * 8, 20 + 128 * 8)


def method_label(method: str) -> str:
    from pva.evaluation.settings import METHOD_LABELS

    return METHOD_LABELS[method]


def test_report_numbers_are_what_the_instruments_give_on_the_pictures(setup):
    out, report, tools = setup["out"], setup["report"], setup["tools"]
    entries = [
        (e["person"], e["photo"])
        for e in report["per_image"]
        if e["method"] == "zero-shot" and e["variant"] == "lowerface"
    ]
    assert len(entries) == 4
    truths = [load(out / "inputs/ground-truth" / p / f"{Path(k).stem}.photo.png") for p, k in entries]
    results = [load(out / "generations/zero-shot" / p / f"{Path(k).stem}.lowerface.png") for p, k in entries]
    dlib = tools.recognizers[1]
    locator = FaceLocator("aligned")
    truth = locate_and_embed(dlib, truths, locator).features
    found = locate_and_embed(dlib, results, locator).features
    values = [float(cosine(r, t[None])[0]) for r, t in zip(found, truth, strict=True)]
    assert report["identity"]["dlib"]["methods"]["zero-shot"]["lowerface"]["mean"] == pytest.approx(
        np.mean(values), abs=1e-6
    )
    real, fake = image_features(truths, tools.features), image_features(results, tools.features)
    assert report["quality"]["zero-shot"]["lowerface"]["fid"] == pytest.approx(fid(real, fake), rel=1e-9)
    clip = [e["clip"] for e in report["per_image"] if e.get("clip") is not None and e["method"] == "no-pva"]
    assert report["text"]["no-pva"]["smiling"]["mean"] == pytest.approx(np.mean(clip))


def test_results_keep_the_photo_outside_the_mask_and_pva_changes_the_inside(setup):
    out = setup["out"]
    changed = {}
    for truth_path in sorted((out / "inputs/ground-truth").rglob("*.png")):
        person, stem = truth_path.parent.name, truth_path.name.split(".")[0]
        truth = load(truth_path)
        for mask_type in SETTINGS.mask_types:
            mask = load(out / "inputs/masks" / person / f"{stem}.{mask_type}.png")[..., 0] > 0.5
            assert 0.05 < mask.float().mean() < 0.8, (person, stem, mask_type)
            results = {
                m: load(out / "generations" / m / person / f"{stem}.{mask_type}.png")
                for m in SETTINGS.methods
            }
            for method, result in results.items():
                assert torch.equal(result[~mask], truth[~mask]), (method, person, stem, mask_type)
            for a, b in (("no-pva", "zero-shot"), ("zero-shot", "personalized")):
                changed.setdefault((a, b), []).append((results[a] - results[b]).abs()[mask].mean().item())
    for pair, deltas in changed.items():
        print(
            f"\nmean |difference| inside the masks, {pair[0]} vs {pair[1]}: {np.mean(deltas):.4f} (min {min(deltas):.4f})"
        )
        assert min(deltas) > 1e-3, pair


def test_every_method_gets_the_same_noise(setup, tmp_path):
    """At strength 0 zero-shot PVA is exactly the base model: with the noise shared by the
    methods its pictures are the no-PVA pictures bit for bit (at strength 1 they differ, above)."""
    settings = replace(
        SETTINGS, methods=("no-pva", "zero-shot"), mask_types=("wholeface",), edits=(), strength=0.0
    )
    evaluate(setup["data"], setup["models"], tmp_path / "run", settings, MetricTools([]))
    base = pictures(tmp_path / "run" / "generations" / "no-pva")
    assert len(base) == 4 and pictures(tmp_path / "run" / "generations" / "zero-shot") == base


def test_a_stopped_run_resumes_exactly_and_other_settings_are_refused(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["out"], run)
    before = pictures(run)
    # "stopped" while painting ada's personalized pictures, after her personalization was saved
    # for bo: before his personalization finished (no model, no record)
    lost = sorted(k for k in before if k.startswith("generations/personalized/ada/"))[:3]
    for key in lost:
        (run / key).unlink()
    (run / "people/ada.json").unlink()
    for name in ("personalized/bo.safetensors", "personalized/bo.json", "people/bo.json"):
        (run / name).unlink()
    for key in [
        k for k in before if k.startswith(("generations/personalized/bo/", "edits/personalized/bo/"))
    ]:
        (run / key).unlink()
    kept = {k: (run / k).stat().st_mtime_ns for k in before if (run / k).is_file()}
    report = evaluate(setup["data"], setup["models"], run, SETTINGS, setup["tools"])
    assert pictures(run) == before  # every picture again, bit for bit (bo's retrained model too)
    assert all((run / k).stat().st_mtime_ns == t for k, t in kept.items())  # the rest untouched
    assert (
        report["identity"] == setup["report"]["identity"] and report["quality"] == setup["report"]["quality"]
    )
    with pytest.raises(PVAError, match=r"holds a run made with other settings \(steps differ\)"):
        evaluate(setup["data"], setup["models"], run, replace(SETTINGS, steps=3))


def test_bad_datasets_are_named(setup, tmp_path):
    models, data = setup["models"], setup["data"]
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    (empty / "split.json").write_text(json.dumps({"test": [], "train": ["ada", "bo"]}))
    with pytest.raises(PVAError, match="has no person with both reference photos and photos to inpaint"):
        evaluate(empty, models, tmp_path / "a", SETTINGS)
    # photos without faces: MTCNN finds none, so every target is skipped and nothing is measured
    blank = tmp_path / "blank"
    shutil.copytree(data, blank)
    for photo in blank.rglob("*.png"):
        Image.new("RGB", (64, 64), (128, 128, 128)).save(photo)
    with pytest.raises(PVAError, match="no result to measure; every target was skipped"):
        evaluate(blank, models, tmp_path / "b", replace(SETTINGS, faces="detect"))
    idi = celebahq_idi_export(tmp_path / "idi", data)
    bad_mask = idi / "IDI/0001/infer_mask/02_wholeface.png"
    Image.new("L", (48, 32), 255).save(bad_mask)  # another shape (a mask at another size is resized)
    with pytest.raises(PVAError, match=r"mask .*02_wholeface.png is 48x32 but its photo .*02.jpg is 64x64"):
        evaluate(idi, models, tmp_path / "c", replace(SETTINGS, edits=()))
    annotation = json.loads((idi / "annotation/idi-2.json").read_text())
    annotation["id2image"]["1"]["infer"].append("09.jpg")
    (idi / "annotation/idi-2.json").write_text(json.dumps(annotation))
    with pytest.raises(PVAError, match=r"lists infer image '09.jpg', which is not in"):
        evaluate(idi, models, tmp_path / "d", SETTINGS)
    with pytest.raises(PVAWeightsError, match="checkpoint .* not found"):
        load_models(tmp_path / "missing.safetensors")


def celebahq_idi_export(root: Path, folders: Path) -> Path:
    """The synthetic people as CelebAHQ-IDI's export lays them out (photos 0-1 references,
    2-3 inpainted, box masks of the face crop for every mask type)."""
    annotation = {"test_ids": [], "train_ids": [], "val_ids": [], "id2image": {}}
    for number, person in enumerate(sorted(p.name for p in folders.iterdir() if p.is_dir()), start=1):
        folder = root / "IDI" / f"{number:04d}"
        for sub in ("ref_image", "infer_image", "infer_mask"):
            (folder / sub).mkdir(parents=True)
        for i, photo in enumerate(sorted((folders / person).glob("*.png"))):
            kind = "ref_image" if i < 2 else "infer_image"
            Image.open(photo).convert("RGB").save(folder / kind / f"{photo.stem}.jpg")
            if kind == "infer_image":
                for mask_type in ("wholeface", "lowerface", "eyebrow", "random"):
                    mask = Image.new("L", (64, 64), 0)
                    mask.paste(255, (16, 16, 48, 48))
                    mask.save(folder / "infer_mask" / f"{photo.stem}_{mask_type}.png")
        annotation["test_ids"].append(number)
        annotation["id2image"][str(number)] = {"ref": ["00.jpg", "01.jpg"], "infer": ["02.jpg", "03.jpg"]}
    (root / "annotation").mkdir()
    (root / "annotation/idi-2.json").write_text(json.dumps(annotation))
    assert open_dataset(root).layout == "celebahq-idi"
    return root


# -- scripts/evaluate ----------------------------------------------------------------------------
def test_script_names_a_missing_weights_file(tmp_path):
    data = write_synthetic_split(tmp_path / "data", people=2, photos=2, size=64)
    missing = tmp_path / "no-such-checkpoint.safetensors"
    result = subprocess.run(
        # no --cpu: the script finds that torch sees no GPU (else ComfyUI would fail looking for one)
        [sys.executable, str(REPO_ROOT / "scripts/evaluate"), "--checkpoint", str(missing),
         "--data", str(data), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: checkpoint {missing} not found" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.training
@pytest.mark.test_models("sd15-inpainting-small-random", "facenet-random")
def test_script_shares_identities_among_processes_and_paints_what_one_process_does(tmp_path):
    """scripts/evaluate on a checkpoint file (the SD1.5-inpainting layout with a small UNet),
    a PVA file and FaceNet weights: two CPU processes under torchrun each paint half of four
    identities; a single process paints exactly the same pictures and numbers."""
    import comfy.sd
    from harness.checkpoints import sd15_inpaint_small_checkpoint

    from pva.method.weights import save_pva

    checkpoint = sd15_inpaint_small_checkpoint()
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    pva = save_pva(PVAModel.initialize_from(model, seed=1), tmp_path / "pva.safetensors")
    del model
    data = write_synthetic_split(tmp_path / "data", people=4, photos=3, size=64)
    arguments = [
        str(REPO_ROOT / "scripts/evaluate"), "--cpu", "--checkpoint", str(checkpoint), "--pva", str(pva),
        "--facenet", str(facenet_random_weights()), "--data", str(data), "--faces", "aligned", "--resolution", "64",
        "--steps", "2", "--methods", "no-pva,zero-shot", "--mask-types", "wholeface,lowerface", "--references", "2",
        "--recognizer", "dlib",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments,
         "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(two.stdout[-3000:], two.stderr[-3000:])
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):  # two identities each
        assert len(re.findall(rf"\[rank {rank}/2\] \d of 2 identities", two.stderr)) == 2, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *arguments, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "[rank 0/1] 4 of 4 identities" in one.stderr
    two_pictures, one_pictures = pictures(tmp_path / "two"), pictures(tmp_path / "one")
    assert len(one_pictures) == 4 * 2 * 2 + 4 + 4 * 2 and two_pictures == one_pictures
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("two", "one")]
    assert reports[0]["identity"] == reports[1]["identity"]


# -- the order the issue asks for, on people the PVA model never saw -------------------------------
@pytest.mark.training
@pytest.mark.test_models("world-base", "world-decoder", "world-identity-model")
@pytest.mark.xfail(
    strict=True,
    reason="not reached yet: the PVA model pretrained on 113 synthetic people on CPU (harness."
    "pretraining.IDENTITY_RECIPE) lowers the held-out denoising loss with the person's own tokens, "
    "but its generations are no closer to the person than the base model's (measured on the 24: "
    "mean FaceNet similarity no-pva 0.720, zero-shot 0.712). Strict: when a stronger pretrained "
    "model makes this pass, drop the mark.",
)
def test_held_out_people_are_painted_more_like_themselves_with_zero_shot_pva(tmp_path):
    """The evaluation harness on the 24 held-out people of the synthetic world (their own
    references encoded, nothing trained on them): zero-shot PVA paints faces closer to the
    ground truth than the base model alone, by at least 0.02 mean FaceNet similarity (about 6%
    of what separates a person from another tint of the same portrait, 0.80 vs 0.47)."""
    from harness.pretraining import identity_model, synthetic_world, world_base, world_vae

    from pva.method.weights import load_pva

    world = synthetic_world()
    base = world_base(world)
    models = EvaluationModels(
        model=base.model,
        vae=world_vae(world),
        encode_text=lambda prompt: [[base.encode_text(prompt)[0], {}]],
        pva=load_pva(identity_model(world)),
        facenet=load_facenet(world.facenet),
        description={"models": "tiny world base, pretrained identity model"},
    )
    settings = EvaluationSettings(
        methods=("no-pva", "zero-shot"), split="val", faces="aligned", resolution=64, references=3, steps=20,
        cfg=3.0, seed=0,
    )  # fmt: skip
    report = evaluate(world.dataset(), models, tmp_path / "run", settings)
    methods = report["identity"]["facenet"]["methods"]
    print("\n[held-out identity] " + "; ".join(f"{m}: {row}" for m, row in methods.items()))
    assert report["identities"] == 24 and report["targets"] >= 20, report["notes"]
    assert methods["zero-shot"]["mean"] > methods["no-pva"]["mean"] + 0.02, methods
